"""The MLA module: absorbed == expanded, masks and padding, attention backends."""

import pytest
import torch

from latentkv import ExactConfig, SVDConfig, convert
from latentkv.runtime.mla import MLADims

from conftest import make_tiny, reference_tolerance

CONFIGS = {"exact": ExactConfig(), "svd-50": SVDConfig(kv_budget=0.5), "svd-12": SVDConfig(kv_budget=0.125)}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_absorbed_equals_expanded(tiny, ids, method):
    conv = convert(tiny, CONFIGS[method], progress=False)
    tol = reference_tolerance(conv, ids)
    with torch.no_grad():
        exp = conv(ids, mla_path="expanded").logits
        absd = conv(ids, mla_path="absorbed").logits
    assert (exp - absd).abs().max().item() <= 50 * tol


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padding_matches_unpadded(impl):
    """A left-padded row must give the same logits on its real tokens as the row alone."""
    model = make_tiny("qwen2-bias")
    model.config._attn_implementation = impl
    conv = convert(model, SVDConfig(kv_budget=0.5), progress=False)
    short = torch.arange(5, 15)[None]
    padded = torch.cat((torch.zeros(1, 6, dtype=torch.long), short), 1)
    mask = torch.cat((torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)), 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = conv(short).logits
        for path in ("expanded", "absorbed"):
            out = conv(padded, attention_mask=mask, position_ids=pos, mla_path=path).logits[:, 6:]
            assert (out - alone).abs().max().item() < 1e-4, path


@pytest.mark.parametrize("path", ["expanded", "absorbed"])
def test_eager_and_sdpa_agree(ids, path):
    """SDPA gets the value zero-padded to the key's width (its fused kernel needs one width); the
    padding must not change a logit."""
    model = make_tiny("llama-gqa")
    conv = convert(model, SVDConfig(kv_budget=0.5), progress=False)
    d = conv.model.layers[0].self_attn.dims
    assert d.qk_nope_head_dim + d.qk_rope_head_dim > d.v_head_dim and d.qk_rope_head_dim > 0  # the padded case
    with torch.no_grad():
        conv.config._attn_implementation = "sdpa"
        a = conv(ids, mla_path=path).logits
        conv.config._attn_implementation = "eager"
        b = conv(ids, mla_path=path).logits
    assert (a - b).abs().max().item() < 1e-5


def test_dims_validation():
    with pytest.raises(ValueError, match="even"):
        MLADims(64, 4, kv_lora_rank=8, qk_rope_head_dim=7, qk_nope_head_dim=0, v_head_dim=16, softmax_scale=0.25)
    d = MLADims(64, 4, kv_lora_rank=8, qk_rope_head_dim=6, qk_nope_head_dim=0, v_head_dim=16, softmax_scale=0.25)
    assert d.cache_values_per_token == 14


def test_latent_norm_runs_both_paths(ids):
    """The optional kv_a_layernorm (stock DeepSeek-V3 engines apply it) keeps both paths equal."""
    from latentkv.runtime.install import install_mla

    model = make_tiny("llama-gqa")
    conv = convert(model, SVDConfig(kv_budget=0.5), progress=False)
    dims = [a.dims.__class__(**{**a.dims.to_dict(), "latent_norm": True}) for a in
            (layer.self_attn for layer in conv.model.layers)]
    state = [layer.self_attn.state_dict() for layer in conv.model.layers]
    install_mla(conv, dims)
    for layer, sd in zip(conv.model.layers, state):
        layer.self_attn.load_state_dict(sd, strict=False)
        torch.nn.init.uniform_(layer.self_attn.kv_a_layernorm.weight, 0.5, 1.5)
    with torch.no_grad():
        a = conv(ids, mla_path="expanded").logits
        b = conv(ids, mla_path="absorbed").logits
    assert (a - b).abs().max().item() < 1e-4


def test_latent_norm_computes_as_deepseek_v3_rmsnorm():
    """kv_a_layernorm / q_a_layernorm compute as transformers' DeepseekV3RMSNorm (fp32 inside, the weight
    applied after the cast back), and bf16 input with float32 weights (heal's autocast) takes no
    mixed-dtype fallback that warns."""
    import warnings

    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    from latentkv.runtime.numerics import rms_norm

    torch.manual_seed(0)
    ours, theirs = torch.nn.RMSNorm(24, eps=1e-6), DeepseekV3RMSNorm(24, eps=1e-6)
    torch.nn.init.uniform_(ours.weight, 0.5, 1.5)
    theirs.weight.data.copy_(ours.weight.data)
    x = torch.randn(3, 5, 24) * 7
    for dtype in (torch.float32, torch.bfloat16):
        o, t = ours.to(dtype), theirs.to(dtype)
        assert torch.equal(rms_norm(x.to(dtype), o), t(x.to(dtype)))
    ours.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = rms_norm(x.bfloat16(), ours)
    assert y.dtype == torch.float32
    assert (y - ours(x)).abs().max().item() < 0.05 * x.abs().max().item()
