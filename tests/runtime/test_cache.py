"""The latent cache: same tokens as no cache, only latents stored, bytes == formula."""

import pytest
import torch

from latentkv import ExactConfig, LatentCache, SVDConfig, convert

from conftest import make_tiny

CONFIGS = {"exact": ExactConfig(), "svd-50": SVDConfig(kv_budget=0.5), "svd-25": SVDConfig(kv_budget=0.25)}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_cached_generate_equals_uncached(tiny, method):
    conv = convert(tiny, CONFIGS[method], progress=False)
    prompt = torch.arange(3, 11)[None]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    uncached = conv.generate(prompt, use_cache=False, **kw)
    cached = conv.generate(prompt, cache=LatentCache(conv), **kw)
    assert torch.equal(uncached, cached)


def test_batched_left_padded_generate_equals_single():
    conv = convert(make_tiny("llama-gqa"), SVDConfig(kv_budget=0.5), progress=False)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    a, b = torch.arange(3, 13)[None], torch.arange(20, 26)[None]
    batch = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 4:], mask[1, 4:] = b[0], 1
    out = conv.generate(batch, attention_mask=mask, cache=LatentCache(conv), **kw)
    assert torch.equal(out[0, 10:], conv.generate(a, **kw)[0, 10:])
    assert torch.equal(out[1, 10:], conv.generate(b, **kw)[0, 6:])


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_cache_holds_only_latents_and_bytes_match_formula(method):
    conv = convert(make_tiny("llama-gqa", layers=3), CONFIGS[method], progress=False)
    cache = LatentCache(conv)
    batch, tokens = 3, 17
    with torch.no_grad():
        conv(torch.randint(0, 300, (batch, tokens)), cache=cache, use_cache=True)
        conv(torch.randint(0, 300, (batch, 1)), cache=cache, use_cache=True)
    tokens += 1
    dims = [layer.self_attn.dims for layer in conv.model.layers]
    shapes = [tuple(t.shape) for t in cache.tensors()]
    expect = [s for d in dims for s in ((batch, 1, tokens, d.kv_lora_rank), (batch, 1, tokens, d.qk_rope_head_dim))]
    assert shapes == expect
    formula = sum(d.kv_lora_rank + d.qk_rope_head_dim for d in dims) * 4  # fp32
    assert cache.bytes_per_token() == formula
    assert cache.nbytes() == formula * tokens * batch
    assert cache.get_seq_length() == tokens


def test_cache_bytes_per_token_without_model():
    conv = convert(make_tiny("llama-gqa"), SVDConfig(kv_budget=0.5), progress=False)
    cache = LatentCache()
    with torch.no_grad():
        conv(torch.arange(9)[None], cache=cache, use_cache=True)
    assert cache.bytes_per_token() == LatentCache(conv).bytes_per_token()


def test_latent_cache_needs_a_converted_model():
    with pytest.raises(ValueError, match="converted by latentkv"):
        LatentCache(make_tiny("llama-gqa"))


def test_deepcopy_keeps_views_of_its_own_buffer():
    """A copied capacity cache is a cache like the original: c_kv / k_pe view its own buffer (so later
    writes show through), share nothing with the original, and keep the length."""
    import copy

    conv = convert(make_tiny("llama-gqa"), SVDConfig(kv_budget=0.5), progress=False)
    cache = LatentCache(conv, capacity=10)
    with torch.no_grad():
        conv(torch.randint(0, 320, (2, 6)), cache=cache, use_cache=True)
    twin = copy.deepcopy(cache)
    for a, b in zip(cache.layers, twin.layers):
        assert b.length == a.length == 6 and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert b.keys._base is b.buffer and b.values._base is b.buffer
        b.buffer.zero_()
        assert b.keys.abs().sum() == 0 and b.values.abs().sum() == 0 and a.keys.abs().sum() > 0
