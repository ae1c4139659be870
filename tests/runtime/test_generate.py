"""Decode paths agree, generation matches transformers, the capacity cache is exact, bench runs."""

import copy

import pytest
import torch

from latentkv import LatentCache, SVDConfig, convert, generate
from latentkv.errors import LatentKVError
from latentkv.runtime.generation import greedy_continuation
from latentkv.runtime.mla import MLAAttention

from conftest import TINY, held_bytes, make_tiny


@pytest.fixture(scope="module")
def conv():
    return convert(make_tiny("llama-gqa", layers=3), SVDConfig(kv_budget=0.25), progress=False)


@pytest.mark.parametrize("family, config", [(f, SVDConfig(kv_budget=0.5)) for f in sorted(TINY)] + [
    ("llama-mha", SVDConfig(kv_lora_rank=8, qk_rope_head_dim=8)),  # small r: W_uk/W_uv pre-folded
    ("qwen2-bias", SVDConfig(kv_lora_rank=4, qk_rope_head_dim=4))])
def test_absorbed_expanded_and_uncached_decode_agree(family, config):
    """Step logits of absorbed decode (capacity cache), expanded decode and a full uncached forward."""
    conv = convert(make_tiny(family), config, progress=False)
    attn = conv.model.layers[0].self_attn
    if config.kv_lora_rank is not None:  # the explicit small ranks must exercise both folds
        with torch.no_grad():
            folds = attn.decode_folds()
            assert (folds["q"] is not None or folds["q_factor"] is not None) and folds["o"] is not None
        assert attn.decode_weight_bytes() < sum(p.numel() * 4 for p in attn.parameters())
    torch.manual_seed(0)
    seq = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        full = conv(seq).logits[:, 12:]  # (B, 8, V): what each decode step must predict
        steps = {}
        for path in ("absorbed", "expanded"):
            kw = {"mla_path": "auto" if path == "absorbed" else "expanded"}  # this call only
            cache = LatentCache(conv, capacity=20)
            conv(seq[:, :12], cache=cache, use_cache=True, **kw)
            steps[path] = torch.cat([conv(seq[:, t:t + 1], cache=cache, use_cache=True, **kw).logits
                                     for t in range(12, 20)], 1)
            assert cache.nbytes() == held_bytes(conv, batch=2, tokens=20)
    tol = 1e-4 * full.abs().max().item()
    assert (steps["absorbed"] - full).abs().max().item() < tol
    assert (steps["expanded"] - full).abs().max().item() < tol


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias"])
def test_factored_query_decode(family):
    """RoRoPE queries span every KV group (n + p = G*d per head) but keep the source's rank d per head:
    decode reads them factored, fewer bytes than the full query, and gives the same steps."""
    from latentkv import LowRankConfig

    torch.manual_seed(2)
    conv = convert(make_tiny(family), LowRankConfig(kv_budget=0.5), calib_ids=torch.randint(0, 320, (8, 32)),
                   progress=False)
    attn = conv.model.layers[0].self_attn
    with torch.no_grad():
        u_t, v = attn.decode_folds()["q_factor"]
    assert v.shape[0] <= attn.dims.num_heads * 16  # rank <= source head_dim per head
    assert attn.decode_weight_bytes() < sum(p.numel() * 4 for p in attn.parameters())
    seq = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        full = conv(seq).logits[:, 10:]
        cache = LatentCache(conv, capacity=16)
        conv(seq[:, :10], cache=cache, use_cache=True)
        steps = torch.cat([conv(seq[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(10, 16)], 1)
    assert (steps - full).abs().max().item() < 1e-4 * full.abs().max().item()


def test_greedy_generate_matches_transformers(conv, tiny_tokenizer):
    prompt = "The quick brown fox jumps"
    ids = tiny_tokenizer(prompt, return_tensors="pt").input_ids
    ours = generate(conv, tiny_tokenizer, prompt, 12, use_eos=False)
    theirs = conv.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    uncached = conv.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                             use_cache=False)
    assert ours.tokens[0] == theirs[0, ids.shape[1]:].tolist() == uncached[0, ids.shape[1]:].tolist()
    assert ours.cache_bytes == LatentCache(conv).bytes_per_token() * (ids.shape[1] + 12)  # exactly the tokens seen
    src = make_tiny("llama-gqa", layers=3)  # a source model goes through the same loop with a DynamicCache
    assert generate(src, tiny_tokenizer, prompt, 6, use_eos=False).tokens[0] == \
        src.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:].tolist()


def test_left_padded_batch_equals_single_runs(conv, tiny_tokenizer):
    prompts = ["The quick brown fox jumps over the lazy dog.", "A latent", "Attention reads every cached token"]
    batch = generate(conv, tiny_tokenizer, prompts, 10, use_eos=False)
    for i, p in enumerate(prompts):
        assert batch.tokens[i] == generate(conv, tiny_tokenizer, p, 10, use_eos=False).tokens[0]
    assert batch.prompt_tokens == [len(tiny_tokenizer(p).input_ids) for p in prompts]


def test_sampling_is_seeded_and_top_p_zero_is_greedy(conv, tiny_tokenizer):
    kw = dict(use_eos=False, temperature=1.5)
    a = generate(conv, tiny_tokenizer, "A latent", 10, seed=1, **kw).tokens
    assert a == generate(conv, tiny_tokenizer, "A latent", 10, seed=1, **kw).tokens
    assert a != generate(conv, tiny_tokenizer, "A latent", 10, seed=2, **kw).tokens
    greedy = generate(conv, tiny_tokenizer, "A latent", 10, use_eos=False).tokens
    assert generate(conv, tiny_tokenizer, "A latent", 10, top_p=1e-9, **kw).tokens == greedy


def test_stop_strings_eos_and_streaming(conv, tiny_tokenizer):
    full = generate(conv, tiny_tokenizer, "A latent", 16, use_eos=False)
    assert full.finish == ["length"] and len(full.tokens[0]) == 16
    stop = full.texts[0][3:6]
    pieces = []
    cut = generate(conv, tiny_tokenizer, "A latent", 16, use_eos=False, stop=(stop,),
                   stream=lambda i, t: pieces.append(t))
    assert cut.finish == ["stop"] and cut.texts[0] == full.texts[0][: full.texts[0].find(stop)]
    assert "".join(pieces) == cut.texts[0]  # what streamed is exactly the final text
    eos = full.tokens[0][2]
    conv2 = copy.deepcopy(conv)
    conv2.generation_config.eos_token_id = eos
    ended = generate(conv2, tiny_tokenizer, "A latent", 16)
    assert ended.finish == ["eos"] and ended.tokens[0] == full.tokens[0][:2]


def test_bad_generation_input(conv, tiny_tokenizer):
    with pytest.raises(LatentKVError, match="exceeds the model's context of 512"):
        generate(conv, tiny_tokenizer, "fox " * 300, 64)
    with pytest.raises(LatentKVError, match="no prompts"):
        generate(conv, tiny_tokenizer, [], 4)
    with pytest.raises(LatentKVError, match="max-new-tokens"):
        generate(conv, tiny_tokenizer, "A", 0)


def test_capacity_cache_refuses_overflow(conv):
    cache = LatentCache(conv, capacity=5)
    with torch.no_grad():
        conv(torch.arange(5)[None], cache=cache, use_cache=True)
        with pytest.raises(LatentKVError, match="latent cache full"):
            conv(torch.arange(1)[None], cache=cache, use_cache=True)


def test_interrupt_leaves_the_model_usable(conv, tiny_tokenizer):
    before = generate(conv, tiny_tokenizer, "A latent", 8, use_eos=False).tokens

    def ctrl_c(i, text):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(conv, tiny_tokenizer, "A latent", 8, use_eos=False, stream=ctrl_c)
    assert generate(conv, tiny_tokenizer, "A latent", 8, use_eos=False).tokens == before


def test_step_flops_count_attention_per_cached_token(conv):
    """Each extra cached token costs 2*(2r + p) FLOPs per head absorbed, 2*2d per head for GQA."""
    from latentkv.reports.bench import step_flops

    d, layers = conv.model.layers[0].self_attn.dims, len(conv.model.layers)
    extra = step_flops(conv, "latent-absorbed", 2, 100) - step_flops(conv, "latent-absorbed", 2, 50)
    assert extra == layers * 2 * 2 * d.num_heads * 50 * (2 * d.kv_lora_rank + d.qk_rope_head_dim)
    src = make_tiny("llama-gqa", layers=3)
    assert step_flops(src, "source", 1, 10) - step_flops(src, "source", 1, 0) == 3 * 2 * 4 * 10 * 2 * 16


def test_path_is_per_call_and_nothing_stays_changed_after_an_error(conv, monkeypatch):
    """A forced path lives for one call: after a call that forced `expanded` and failed, the next decode
    step takes the absorbed path again (there is no path attribute to leave behind)."""
    attn = conv.model.layers[0].self_attn
    assert not hasattr(attn, "path")
    seq = torch.randint(0, 320, (1, 6))
    used = []
    real = MLAAttention._decode
    monkeypatch.setattr(MLAAttention, "_decode", lambda self, *a: used.append(True) or real(self, *a))
    monkeypatch.setattr(MLAAttention, "_expanded", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    cache = LatentCache(conv, capacity=8)
    with torch.no_grad():
        conv(seq[:, :5], cache=cache, use_cache=True, mla_path="absorbed")
        with pytest.raises(RuntimeError):
            conv(seq[:, 5:], cache=copy.deepcopy(cache), use_cache=True, mla_path="expanded")
        conv(seq[:, 5:], cache=cache, use_cache=True)
    assert used, "a plain decode step after the failed forced call did not take the absorbed path"


def test_static_baseline_decodes_like_the_dynamic_cache():
    """bench's fair baseline: a prefilled StaticCache repeated over the batch decodes what DynamicCache does."""
    import copy

    from latentkv.reports.bench import prefilled_cache, repeat_batch
    from latentkv.runtime.generation import decode_one_token

    model = make_tiny("llama-gqa")
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    steps = {}
    for kind in ("own", "static"):
        cache = copy.deepcopy(prefilled_cache(model, ids, 16, "model", kind)[0])
        repeat_batch(cache, 3)
        steps[kind] = decode_one_token(model, torch.tensor([5, 6, 7]), torch.full((3, 1), 12), cache)
    assert torch.allclose(steps["own"], steps["static"], atol=1e-5)


def test_bench_takes_earlier_roofs(conv):
    """bench(roofs=...): the floors come from the given bandwidth and matmul rate, not a new measurement."""
    from latentkv.reports.bench import bench

    out = bench(conv, contexts=(8,), batches=(1,), new_tokens=1, progress=False, roofs=(1e9, 2e9))
    assert (out["bandwidth_bytes_per_s"], out["flops_per_s"]) == (1e9, 2e9)
    for r in out["rows"]:
        assert r["floor_s"] == r["step_bytes"] / 1e9 and r["compute_floor_s"] == r["step_flops"] / 2e9


def test_repeated_caches_own_their_tensors(conv):
    """repeat_interleave returns a view of a (B, b, ...) tensor, and a compiled step given one fails in
    inductor ("wrong number of dimensions"): after repeat_batch no cache tensor is such a view."""
    from latentkv.reports.bench import prefilled_cache, repeat_batch

    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    for model, kind in ((conv, "own"), (make_tiny("llama-gqa"), "own"), (make_tiny("llama-gqa"), "static")):
        cache = prefilled_cache(model, ids, 16, "model", kind)[0]
        repeat_batch(cache, 3)
        for layer in cache.layers:
            owned = [layer.buffer] if getattr(layer, "buffer", None) is not None else [layer.keys, layer.values]
            assert all(t._base is None and t.shape[0] == 3 for t in owned)
            assert layer.keys.shape[0] == 3


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-sliding", "qwen3-qknorm"])
def test_chunked_prefill_equals_one_shot(name):
    """bench prefills in chunks: the last logits and the next decode step match a one-shot prefill."""
    from latentkv.runtime.generation import decode_one_token, new_cache, prefill

    conv = convert(make_tiny(name), SVDConfig(kv_budget=0.5), progress=False)
    ids = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(0))
    out = {}
    for chunk in (None, 5):
        cache = new_cache(conv, 24)
        last = prefill(conv, ids, cache, chunk=chunk)
        out[chunk] = (last, decode_one_token(conv, torch.tensor([3, 4]), torch.full((2, 1), 23), cache))
    for a, b in zip(out[None], out[5]):
        assert (a - b).abs().max().item() <= 1e-5  # fp32, same function in a different order of sums


def test_compiled_decode_equals_eager():
    """compiled_decoder: the same step logits as eager decode over the latent cache and transformers'
    StaticCache, across the cache-length recompile (fp32; inductor may reorder sums: 1e-4 of the largest)."""
    import torch._dynamo

    from latentkv.reports.bench import prefilled_cache, repeat_batch
    from latentkv.runtime.generation import compiled_decoder, decode_one_token

    torch._dynamo.reset()
    source = make_tiny("llama-gqa")
    conv = convert(make_tiny("llama-gqa"), SVDConfig(kv_lora_rank=8, qk_rope_head_dim=8), progress=False)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    for model, kind in ((conv, "own"), (source, "static")):
        first = prefilled_cache(model, ids, 20, "model", kind)[0]
        repeat_batch(first, 2)
        steps = {}
        for name, fn in (("eager", decode_one_token), ("compiled", compiled_decoder(model))):
            cache = copy.deepcopy(first)
            steps[name] = torch.stack([fn(model, torch.tensor([5 + s, 9 + s]), torch.full((2, 1), 12 + s), cache)
                                       for s in range(4)])
        assert (steps["compiled"] - steps["eager"]).abs().max().item() <= 1e-4 * steps["eager"].abs().max().item()


def test_bench_compile_adds_compiled_twins(conv):
    """bench(compile=True): a compiled twin of the absorbed row (not of the expanded one), timed after
    its warm-up, reading the bytes and FLOPs of its eager variant."""
    from latentkv.reports.bench import bench

    # A limit of 3 compilations per function fits one row (the first length, dynamic in length, the cache
    # filled to capacity) but not two: the second batch size only runs compiled because each row starts
    # afresh (past the limit bench raises instead of timing eager steps).
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
        rows = bench(conv, contexts=(16,), batches=(1, 2), new_tokens=3, progress=False, compile=True)["rows"]
    by = {r["variant"]: r for r in rows if r["batch"] == 1}
    assert set(by) == {"latent-expanded", "latent-absorbed", "latent-absorbed-compiled"}
    assert all("decode_step_s" in r for r in rows if r["batch"] == 2)
    twin, eager = by["latent-absorbed-compiled"], by["latent-absorbed"]
    assert twin["step_bytes"] == eager["step_bytes"] and twin["step_flops"] == eager["step_flops"]
    assert twin["decode_step_s"] > 0 and twin["cache_bytes"] == eager["cache_bytes"]


@pytest.mark.parametrize("which", ["source", "converted"])
def test_greedy_continuation_equals_uncached_greedy(conv, which):
    """The passkey probe's decoder: through the cache, the same ids as re-running the whole sequence."""
    model = make_tiny("llama-gqa", layers=3) if which == "source" else conv
    torch.manual_seed(1)
    ids = torch.randint(0, 320, (1, 16))
    want = ids
    with torch.no_grad():
        for _ in range(6):
            want = torch.cat((want, model(want).logits[:, -1:].argmax(-1)), 1)
    assert greedy_continuation(model, ids[0].tolist(), 6) == want[0, 16:].tolist()
