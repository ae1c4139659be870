"""Conversion invariants over every method on every tiny family."""

import pytest
import torch

from latentkv import ExactConfig, SVDConfig, convert, record_of
from latentkv.errors import LatentKVError
from latentkv.runtime.mla import MLAAttention

from conftest import TINY, make_tiny, reference_tolerance

# Full-budget configs of each method: all must reproduce the source to rounding.
FULL_BUDGET = {
    "exact": lambda layout: ExactConfig(),
    "svd-full-rank": lambda layout: SVDConfig(kv_lora_rank=layout.num_kv_heads * layout.head_dim,
                                              qk_rope_head_dim=layout.num_kv_heads * layout.head_dim),
}
REDUCED = {"svd-50": SVDConfig(kv_budget=0.5), "svd-25": SVDConfig(kv_budget=0.25),
           "svd-explicit": SVDConfig(kv_lora_rank=10, qk_rope_head_dim=8)}


def _layout(model):
    from latentkv.families import source_layout

    return source_layout(model.config)


@pytest.mark.parametrize("method", sorted(FULL_BUDGET))
def test_full_budget_reproduces_source(tiny, ids, method):
    tol = reference_tolerance(tiny, ids)
    conv = convert(tiny, FULL_BUDGET[method](_layout(tiny)), progress=False)
    with torch.no_grad():
        diff = (conv(ids).logits - tiny(ids).logits).abs().max().item()
    assert diff <= min(50 * tol, 1e-4), f"{method}: max abs diff {diff:.2e} vs rounding {tol:.2e}"


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_reduced_budget_shrinks_cache_and_stays_finite(name):
    model = make_tiny("llama-gqa")
    conv = convert(model, REDUCED[name], progress=False)
    rec = record_of(conv)
    values = [d["kv_lora_rank"] + d["qk_rope_head_dim"] for d in rec["layers"]]
    src = rec["source"]["kv_values_per_token_per_layer"]
    assert all(v < src for v in values)
    if REDUCED[name].kv_budget:
        assert values[0] == round(REDUCED[name].kv_budget * src)
    with torch.no_grad():
        assert torch.isfinite(conv(torch.arange(20)[None]).logits).all()


def test_source_is_not_mutated(ids):
    model = make_tiny("qwen2-bias")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model, SVDConfig(kv_budget=0.5), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, MLAAttention) for m in model.modules())


def test_record_describes_conversion():
    model = make_tiny("llama-gqa")
    conv = convert(model, SVDConfig(kv_budget=0.5), progress=False)
    rec = record_of(conv)
    assert rec["conversion"] == {"method": "svd", "version": 1, "kv_budget": 0.5, "kv_lora_rank": None, "kv_values": None,
                                 "qk_rope_head_dim": None}
    assert rec["source"]["num_kv_heads"] == 2 and len(rec["layers"]) == 2
    attn = conv.model.layers[0].self_attn
    assert attn.dims.kv_lora_rank == rec["layers"][0]["kv_lora_rank"]


def test_svd_error_falls_with_rank():
    """More latent rank can only help a truncated SVD: logit error is monotone in the budget."""
    model = make_tiny("llama-mha")
    x = torch.arange(30)[None]
    with torch.no_grad():
        ref = model(x).logits
        errs = [(convert(model, SVDConfig(kv_lora_rank=r, qk_rope_head_dim=32), progress=False)(x).logits - ref)
                .abs().mean().item() for r in (8, 24, 48, 64)]
    assert errs == sorted(errs, reverse=True), errs


@pytest.mark.parametrize("kw, match", [
    (dict(kv_budget=0.0), "must be in"), (dict(kv_budget=1.5), "must be in"),
    (dict(kv_budget=0.5, kv_lora_rank=4), "give one of"), (dict(kv_lora_rank=4), "go together"),
    (dict(kv_budget=0.5, kv_values=10), "give one of"), (dict(kv_values=1), "at least 2"), (dict(), "give --kv-budget"),
])
def test_bad_budget_configs(kw, match):
    with pytest.raises(LatentKVError, match=match):
        SVDConfig(**kw)


@pytest.mark.parametrize("r, p, match", [(10, 7, "multiple of"), (10, 40, "multiple of"), (10, 34, "multiple of"),
                                         (0, 8, "between 1"), (1000, 8, "between 1")])
def test_ranks_that_do_not_fit(r, p, match):
    with pytest.raises(LatentKVError, match=match):
        convert(make_tiny("llama-gqa"), SVDConfig(kv_lora_rank=r, qk_rope_head_dim=p), progress=False)


def test_unsupported_rope_scaling_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                       "original_max_position_embeddings": 64})
    with pytest.raises(LatentKVError, match="unsupported RoPE scaling 'yarn'"):
        convert(LlamaForCausalLM(cfg), ExactConfig(), progress=False)


def test_every_family_is_covered():
    from latentkv.families import SUPPORTED_FAMILIES

    assert set(SUPPORTED_FAMILIES) == {TINY[n][0].model_type for n in TINY}


def test_refused_families_say_why():
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=2)
    model = __import__("transformers").AutoModelForCausalLM.from_config(config)
    with pytest.raises(LatentKVError, match="mixture-of-experts"):
        convert(model, ExactConfig(), progress=False)


@pytest.mark.parametrize("name", ["qwen3-qknorm", "gemma3-qknorm", "olmo2-qknorm"])
def test_qk_norm_cannot_be_export_grade(name):
    """DeepSeek-V3 has no slot for the per-token key scale: --target deepseek_v3 is refused with the reason."""
    from latentkv.conversion.configs import make_config

    with pytest.raises(LatentKVError, match="per-token 1/rms"):
        convert(make_tiny(name), make_config(kv_budget=0.5, target="deepseek_v3"), progress=False)


def test_qk_norm_with_gqa_keeps_kv_heads_apart():
    """Qwen3 scales each KV head's key separately: an explicit head-mixing RoPE strategy is refused; the
    default falls back to one that keeps heads apart (and is then exact at the full budget)."""
    from latentkv import LowRankConfig
    from latentkv.conversion.configs import make_config
    from latentkv.conversion.dims import fit_to_source

    model = make_tiny("qwen3-qknorm")
    with pytest.raises(LatentKVError, match="mixes KV heads"):
        convert(model, LowRankConfig(kv_budget=0.5, rope="rorope"), calib_ids=torch.zeros(4, 16, dtype=torch.long),
                progress=False)
    assert fit_to_source(make_config(kv_budget=0.5), _layout(model)).rope == "2norm"
    assert fit_to_source(make_config(kv_budget=0.5), _layout(make_tiny("gemma3-qknorm"))).rope == "rorope"  # MQA


def test_nope_layers_cache_no_rope_key(calib_free_budget=0.5):
    """SmolLM3's NoPE layers rotate nothing: their whole budget goes to the latent (qk_rope_head_dim 0),
    while rotary layers keep a rope key; the cache formula follows each layer."""
    from latentkv import LatentCache

    model = make_tiny("smollm3-nope")
    conv = convert(model, SVDConfig(kv_budget=calib_free_budget), progress=False)
    rope, nope = (layer.self_attn.dims for layer in conv.model.layers)
    assert rope.qk_rope_head_dim > 0 and nope.qk_rope_head_dim == 0
    assert nope.kv_lora_rank == rope.kv_lora_rank + rope.qk_rope_head_dim
    cache = LatentCache(conv)
    with torch.no_grad():
        conv(torch.arange(10)[None], cache=cache)
    assert cache.nbytes() == 4 * 10 * (rope.cache_values_per_token + nope.cache_values_per_token)


def test_phi3_fused_projection_is_read_by_rows():
    from latentkv.families import read_attention

    attn = make_tiny("phi3-fused").model.layers[0].self_attn
    src = read_attention(attn)
    q, k, v = attn.qkv_proj.weight.split([64, 32, 32])
    assert torch.equal(src.w_q, q) and torch.equal(src.w_k, k) and torch.equal(src.w_v, v)
