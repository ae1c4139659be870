"""A quantized latent cache (runtime/quant.py): error bounds, bytes == formula, decode == decode over the
dequantized tensors, the perplexity protocol, and one-line refusals."""

import pytest
import torch

from latentkv import LatentCache, LatentKVError, SVDConfig, convert
from latentkv.evaluation.perplexity import perplexity
from latentkv.runtime.quant import CacheFormat

from conftest import make_tiny

FORMATS = [CacheFormat("int8"), CacheFormat("int4"), CacheFormat("int8", group=8), CacheFormat("int4", group=4),
           CacheFormat("fp8_e4m3"), CacheFormat("int4", rope=True), CacheFormat("fp8_e4m3", rope=True),
           CacheFormat("int4_asym"), CacheFormat("int4_asym", group=4, rope=True)]


def _id(f: CacheFormat) -> str:
    return f"{f.name}-g{f.group}-rope{int(f.rope)}"


@pytest.mark.parametrize("fmt", FORMATS, ids=_id)
def test_round_trip_error_is_bounded(fmt):
    torch.manual_seed(0)
    x = torch.randn(3, 1, 7, 37) * torch.logspace(-2, 1, 7)[:, None]  # tokens of very different sizes
    y = fmt.dequantize(fmt.quantize(x), 37, torch.float32)
    assert fmt.quantize(x).dtype == torch.uint8 and fmt.quantize(x).shape[-1] == fmt.nbytes(37)
    err = (y - x).abs()
    if fmt.name == "fp8_e4m3":  # 3 mantissa bits: half an ulp is 2^-4 of the value; subnormal steps 2^-9
        assert (err <= x.abs() / 16 + 2.0 ** -10).all()
        return
    g = fmt.group or 37
    blocks = torch.nn.functional.pad(x, (0, -37 % g), value=float("nan")).unflatten(-1, (-1, g))
    if fmt.asymmetric:  # 16 levels over [min, max]; the fp16 zero point adds up to 2^-11 of |min|
        spread = blocks.nan_to_num(-1e9).amax(-1) - blocks.nan_to_num(1e9).amin(-1)
        low = blocks.nan_to_num(1e9).amin(-1).abs()
        bound = ((0.502 * spread / 15 + low * 2.0 ** -10)).repeat_interleave(g, -1)[..., :37]
    else:  # half a step (the fp16 scale rounds by at most 2^-11)
        bound = 0.502 * blocks.nan_to_num(0).abs().amax(-1).repeat_interleave(g, -1)[..., :37]
        bound = bound / {"int8": 127, "int4": 7}[fmt.name]
    assert (err <= bound + 1e-7).all()


def test_asymmetric_int4_beats_symmetric_on_one_sided_values():
    """The point of int4_asym: a group that sits on one side of zero gets all 16 levels over its range."""
    torch.manual_seed(0)
    x = torch.rand(64, 32) + 0.5  # every value in [0.5, 1.5]
    err = {name: (CacheFormat(name).dequantize(CacheFormat(name).quantize(x), 32, torch.float32) - x).pow(2).mean()
           for name in ("int4", "int4_asym")}
    assert err["int4_asym"] < 0.25 * err["int4"]
    assert CacheFormat("int4_asym", group=8).nbytes(32) == 16 + 4 * 2 * 2  # codes + (scale, zero point) per group


def test_fp8_saturates_instead_of_nan():
    x = torch.tensor([1000.0, -1000.0, 0.5])
    y = CacheFormat("fp8_e4m3").dequantize(CacheFormat("fp8_e4m3").quantize(x), 3, torch.float32)
    assert torch.isfinite(y).all() and y[0] == 448 and y[1] == -448


@pytest.mark.parametrize("fmt", FORMATS, ids=_id)
@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-qknorm"])
def test_bytes_equal_the_formula(fmt, name):
    conv = convert(make_tiny(name), SVDConfig(kv_budget=0.5), progress=False)
    cache = LatentCache(conv, cache_dtype=fmt)
    with torch.no_grad():
        conv(torch.randint(0, 320, (2, 11)), cache=cache)
    d = conv.model.layers[0].self_attn.dims
    r, p, s = d.kv_lora_rank, d.qk_rope_head_dim, d.key_scales
    params = 2 if fmt.asymmetric else 1  # fp16 scale (and zero point) per group
    scales = 2 * params * (1 if fmt.group is None else -(-r // fmt.group)) if fmt.name != "fp8_e4m3" else 0
    codes = r if fmt.name not in ("int4", "int4_asym") else (r + 1) // 2
    rope_scales = 2 * params * (1 if fmt.group is None else -(-p // fmt.group))
    rope_codes = p if fmt.name in ("fp8_e4m3", "int8") else (p + 1) // 2
    rope = (rope_codes + (rope_scales if fmt.name != "fp8_e4m3" else 0)) if fmt.rope else 4 * p
    per_layer = codes + scales + rope + 4 * s
    assert cache.bytes_per_token() == 2 * per_layer
    assert cache.nbytes() == cache.bytes_per_token() * 2 * 11


class DequantizedCache(LatentCache):
    """The reference: a plain fp32 cache that stores each written token's dequantized values."""

    def __init__(self, model, fmt: CacheFormat):
        super().__init__(model)
        self.fmt, self.rope = fmt, [a.self_attn.dims.qk_rope_head_dim for a in model.model.layers]

    def update(self, c_kv, k_pe, layer_idx, *args, **kwargs):
        fake = lambda x: self.fmt.dequantize(self.fmt.quantize(x), x.shape[-1], x.dtype)  # noqa: E731
        if self.fmt.rope:
            p = self.rope[layer_idx]
            k_pe = torch.cat((fake(k_pe[..., :p]), k_pe[..., p:]), -1)
        return super().update(fake(c_kv), k_pe, layer_idx, *args, **kwargs)


@pytest.mark.parametrize("fmt", [CacheFormat("int4", group=8), CacheFormat("fp8_e4m3", rope=True),
                                 CacheFormat("int8", rope=True), CacheFormat("int4_asym", group=8, rope=True)], ids=_id)
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-sliding", "qwen3-qknorm"])
def test_decode_reads_the_dequantized_cache(fmt, name):
    """Prefill and steps over the quantized (packed) cache == the same over a plain cache holding the
    dequantized tensors; and the quantization shows against an unquantized run."""
    conv = convert(make_tiny(name), SVDConfig(kv_budget=0.5), progress=False)
    ids = torch.randint(0, 320, (2, 21), generator=torch.Generator().manual_seed(1))
    quant, ref = LatentCache(conv, cache_dtype=fmt), DequantizedCache(conv, fmt)
    with torch.no_grad():
        a, b = conv(ids[:, :-3], cache=quant).logits, conv(ids[:, :-3], cache=ref).logits
        assert (a - b).abs().max().item() <= 1e-5
        for t in range(-3, 0):
            step = ids[:, t:t + 1] if t < -1 else ids[:, -1:]
            got, want = conv(step, cache=quant).logits, conv(step, cache=ref).logits
            assert (got - want).abs().max().item() <= 1e-5
        exact = conv(ids).logits[:, -1:]
    assert 0 < (got - exact).abs().max().item() < 0.1


def test_perplexity_protocol_reads_the_quantized_cache(tiny_tokenizer):
    conv = convert(make_tiny("llama-gqa"), SVDConfig(kv_budget=0.5), progress=False)
    text = "the quick brown fox jumps over the lazy dog " * 20
    plain = perplexity(conv, tiny_tokenizer, text, seq_len=32, max_windows=3, progress=False)
    same = perplexity(conv, tiny_tokenizer, text, seq_len=32, max_windows=3, progress=False,
                      cache_factory=lambda: LatentCache(conv))
    int4 = perplexity(conv, tiny_tokenizer, text, seq_len=32, max_windows=3, progress=False,
                      cache_factory=lambda: LatentCache(conv, cache_dtype="int4"))
    assert abs(same.nll - plain.nll) < 1e-5  # an unquantized cache changes nothing
    assert int4.nll != plain.nll and abs(int4.nll - plain.nll) < 0.5


@pytest.mark.parametrize("bad, match", [(dict(name="int3"), "unknown --cache-dtype 'int3'"),
                                        (dict(name="fp8_e4m3", group=8), "--cache-group 8 needs an int"),
                                        (dict(name="int8", group=0), "--cache-group 0")])
def test_bad_formats_are_one_line(bad, match):
    with pytest.raises(LatentKVError, match=match):
        CacheFormat(**bad)


def test_quantized_cache_needs_the_model():
    with pytest.raises(LatentKVError, match="needs the model"):
        LatentCache(cache_dtype="int8")


def test_source_kv_baseline_quantizes_keys_and_values():
    from latentkv.runtime.cache import QuantizedKVCache

    model = make_tiny("llama-gqa")  # 2 layers, 2 KV heads of 16
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        got = model(ids, cache=QuantizedKVCache(model, "int4"), use_cache=True).logits
        fine = model(ids, cache=QuantizedKVCache(model, "int8"), use_cache=True).logits
    assert 0 < (fine - ref).abs().max() < (got - ref).abs().max() < 0.1
    assert QuantizedKVCache(model, "int4").bytes_per_token() == 2 * 2 * 2 * (8 + 2)  # layers x K/V x heads x (codes + scale)
