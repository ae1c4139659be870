"""QK-norm sources (Qwen3, Gemma-3, OLMo-2): exact at the full budget through the calibrated method, the
per-token key scales cached and counted, absorbed decode, save/load, and the choices the norm forces."""

from __future__ import annotations

import pytest
import torch

from latentkv import LatentCache, LowRankConfig, convert, load, record_of, save
from latentkv.conversion.configs import make_config
from latentkv.families import source_layout

from conftest import make_tiny

QK_NORM = ["qwen3-qknorm", "gemma3-qknorm", "olmo2-qknorm"]


@pytest.fixture(scope="module")
def calib_ids():
    torch.manual_seed(3)
    return torch.randint(0, 320, (10, 32))


def _x():
    torch.manual_seed(4)
    return torch.randint(0, 320, (2, 24))


@pytest.mark.parametrize("name", QK_NORM)
@pytest.mark.parametrize("factorizer", ["svd", "output"])
def test_calibrated_full_budget_is_exact(name, factorizer, calib_ids):
    """Every key dim rotated and a full-rank latent with the default-allowed RoPE strategy of the family."""
    model = make_tiny(name)
    lay = source_layout(model.config)
    full = lay.num_kv_heads * lay.head_dim
    rope = "2norm" if name == "qwen3-qknorm" else "rorope"
    conv = convert(model, LowRankConfig(kv_lora_rank=full, qk_rope_head_dim=full, rope=rope, factorizer=factorizer),
                   calib_ids=calib_ids, progress=False)
    with torch.no_grad():
        assert (conv(_x()).logits - model(_x()).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", QK_NORM)
def test_default_conversion_caches_scales_and_round_trips(name, calib_ids, tiny_tokenizer, tmp_path):
    """`convert --kv-budget 0.5` defaults: the key scales sit in the cache beside c_kv and k_pe and count in
    the budget; absorbed decode over the cache equals the expanded forward; save/load keeps the function."""
    model = make_tiny(name)
    lay = source_layout(model.config)
    conv = convert(model, make_config(kv_budget=0.5), calib_ids=calib_ids, progress=False)
    rec = record_of(conv)
    layer = rec["layers"][0]
    assert layer["key_scales"] == lay.key_scales == (lay.num_kv_heads if name != "olmo2-qknorm" else 1)
    assert layer["kv_lora_rank"] + layer["qk_rope_head_dim"] + layer["key_scales"] <= lay.kv_values_per_token // 2
    x = _x()
    cache = LatentCache(conv)
    with torch.no_grad():
        full = conv(x, mla_path="expanded").logits
        conv(x[:, :-1], cache=cache)
        step = conv(x[:, -1:], cache=cache, mla_path="absorbed").logits[:, -1]
    assert (step - full[:, -1]).abs().max().item() < 1e-4
    values = sum(d["kv_lora_rank"] + d["qk_rope_head_dim"] + d["key_scales"] for d in rec["layers"])
    assert cache.bytes_per_token() == 4 * values
    save(conv, tiny_tokenizer, tmp_path / "out")
    loaded, _ = load(tmp_path / "out")
    with torch.no_grad():  # (the loaded model may pick another attention kernel than the tiny one's eager)
        assert (loaded(x).logits - conv(x).logits).abs().max().item() < 1e-5


def test_key_scale_is_the_source_keys_rms():
    """The scale cached for a token is 1 / rms of that token's exact source key, per KV head (Qwen3)."""
    model = make_tiny("qwen3-qknorm")
    conv = convert(model, make_config(kv_budget=0.5, method="svd"), progress=False)
    src, mla = model.model.layers[0].self_attn, conv.model.layers[0].self_attn
    h = torch.randn(1, 5, 64)
    k = src.k_proj(h).view(1, 5, 2, 16)
    want = torch.rsqrt(k.pow(2).mean(-1) + src.k_norm.variance_epsilon)  # (1, 5, G)
    with torch.no_grad():
        _, _, scales = mla._latent(h)
    assert torch.allclose(scales[:, 0], want, rtol=1e-5)
