"""Local layers (DuoAttention/RazorAttention with MLA): the sinks + window rule, the same function cached
or not and on both paths, bounded cache bytes, save/load, refusals."""

import pytest
import torch

from latentkv import LatentCache, SVDConfig, convert, load, save
from latentkv.errors import LatentKVError
from latentkv.runtime.install import held_bytes, set_local_layers
from latentkv.runtime.local import LocalSpan, local_mask

from conftest import make_tiny

SPAN = LocalSpan(sinks=2, window=5)


def _conv(layers=2, local=(0,), span=SPAN):
    conv = convert(make_tiny("llama-gqa", layers=layers), SVDConfig(kv_budget=0.5), progress=False)
    set_local_layers(conv, local, span)
    return conv


def test_mask_rule():
    m = local_mask(torch.arange(10)[None], torch.arange(10), SPAN)[0, 0]
    for t in range(10):
        for s in range(10):
            assert bool(m[t, s]) == (s <= t and (s < 2 or t - s < 5)), (t, s)


@pytest.mark.parametrize("path", ["expanded", "absorbed"])
def test_cached_decode_equals_uncached(path):
    """Prefill 7 tokens, then decode one at a time well past sinks + window: each step's logits equal the
    uncached forward of the whole sequence (the sink layer's trimming loses nothing a query may see)."""
    conv = _conv()
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = conv(ids, mla_path=path).logits
        cache = LatentCache(conv)
        steps = [conv(ids[:, :7], cache=cache, use_cache=True, mla_path=path).logits]
        for t in range(7, 20):
            steps.append(conv(ids[:, t:t + 1], cache=cache, use_cache=True, mla_path=path).logits)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    local, other = cache.layers[0], cache.layers[1]
    assert local.c_kv.shape[2] == SPAN.sinks + SPAN.window - 1 and other.c_kv.shape[2] == 20
    assert cache.nbytes() == held_bytes(conv, 20) * 2  # two sequences
    assert torch.equal(local.positions, torch.tensor([0, 1, 16, 17, 18, 19]))


def test_a_wide_window_is_the_full_model():
    conv = _conv(span=LocalSpan(sinks=0, window=64))
    ref = _conv(local=())
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        assert torch.equal(conv(ids).logits, ref(ids).logits)


def test_a_local_layer_sees_only_sinks_and_window():
    """One layer, local: the last position's output ignores a token outside sinks + window and not another
    inside them."""
    conv = _conv(layers=1)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = conv(ids).logits[0, -1]
        outside, sink = ids.clone(), ids.clone()
        outside[0, 4] = (ids[0, 4] + 1) % 300  # 11 - 4 >= window, not a sink
        sink[0, 1] = (ids[0, 1] + 1) % 300
        assert torch.equal(conv(outside).logits[0, -1], base)
        assert not torch.allclose(conv(sink).logits[0, -1], base)


def test_generate_and_save_load_keep_local_layers(tmp_path):
    conv = _conv()
    prompt = torch.arange(3, 12)[None]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    out = conv.generate(prompt, cache=LatentCache(conv), **kw)
    assert torch.equal(out, conv.generate(prompt, use_cache=False, **kw))
    save(conv, None, tmp_path / "m")
    back, _ = load(tmp_path / "m")
    assert back.model.layers[0].self_attn.local == SPAN and back.model.layers[1].self_attn.local is None
    assert torch.equal(back.generate(prompt, cache=LatentCache(back), **kw), out)


def test_held_bytes_formula():
    conv = _conv(layers=3, local=(1,))
    per = [a.self_attn.dims.cache_values_per_token * 4 for a in conv.model.layers]
    assert held_bytes(conv, 3) == sum(per) * 3
    assert held_bytes(conv, 100) == (per[0] + per[2]) * 100 + per[1] * (SPAN.sinks + SPAN.window - 1)


def test_refusals():
    conv = _conv()
    with pytest.raises(LatentKVError, match="do not exist"):
        set_local_layers(conv, [5])
    with pytest.raises(LatentKVError, match="sinks >= 0 and window >= 1"):
        LocalSpan(sinks=-1)
    with pytest.raises(LatentKVError, match="does not combine with local layers"):
        LatentCache(conv, cache_dtype="int8")
    with pytest.raises(LatentKVError, match="converted by latentkv"):
        set_local_layers(make_tiny("llama-gqa"), [0])


def test_export_refuses_local_layers(tmp_path):
    from latentkv.deepseek.export import export

    conv = convert(make_tiny("llama-gqa"), SVDConfig(kv_budget=0.5), progress=False)
    set_local_layers(conv, [1])
    with pytest.raises(LatentKVError, match="local layers .* no DeepSeek-V3 form"):
        export(conv, tmp_path / "x")


def test_retrieval_probe_scores_every_layer_and_restores(tiny_tokenizer):
    from latentkv.reports.duo import local_order, retrieval_scores

    conv = _conv(layers=3, local=(2,))
    res = retrieval_scores(conv, tiny_tokenizer, context=200, span=LocalSpan(2, 16), progress=False)
    assert len(res["scores"]) == 3 and all(s == s for s in res["scores"])  # finite, one per layer
    assert [a.self_attn.local for a in conv.model.layers] == [None, None, SPAN]  # as before the probe
    order = local_order(res["scores"])
    assert sorted(order) == [0, 1, 2] and res["scores"][order[0]] == min(res["scores"])
