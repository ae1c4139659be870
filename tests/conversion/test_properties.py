"""Property-based checks (hypothesis) of the conversion invariants over random small configs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentkv import ExactConfig, LatentCache, SVDConfig, convert, record_of

from conftest import TINY, held_bytes, reference_tolerance

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# family -> (config class, model class), the classes conftest's tiny models use
FAMILIES = {family: TINY[name][:2] for family, name in
            (("llama", "llama-gqa"), ("qwen2", "qwen2-bias"), ("mistral", "mistral-gqa"), ("gemma2", "gemma2-softcap"),
             ("qwen3", "qwen3-qknorm"), ("gemma3", "gemma3-qknorm"), ("olmo2", "olmo2-qknorm"), ("phi3", "phi3-fused"),
             ("smollm3", "smollm3-nope"))}


@st.composite
def configs(draw):
    """A random attention shape (heads, KV heads dividing them, head_dim) of a random family:
    Llama, Qwen2 (biases), Mistral (a window or none), Gemma-2 (soft-cap, query scale, windows),
    Qwen3 and OLMo-2 (QK-norm per head / over the projection), Gemma-3 (QK-norm, local and global
    RoPE bases, windows on some layers), Phi-3 (fused qkv_proj), SmolLM3 (NoPE layers)."""
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([8, 16]))
    family = draw(st.sampled_from(sorted(FAMILIES)))
    extra = {}
    theta = draw(st.sampled_from([10000.0, 500000.0]))
    if family in ("mistral", "gemma2", "gemma3"):
        extra["sliding_window"] = draw(st.sampled_from([4, 16] + ([None] if family == "mistral" else [])))
    if family in ("gemma2", "gemma3"):
        extra.update(query_pre_attn_scalar=draw(st.sampled_from([head_dim, 2 * head_dim])), attn_implementation="eager")
    if family == "gemma2":
        extra["attn_logit_softcapping"] = draw(st.sampled_from([0.5, 2.0, 50.0]))
    if family == "gemma3":
        kinds = ("sliding_attention", "full_attention")
        extra.update(layer_types=[draw(st.sampled_from(kinds)) for _ in range(2)], rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": theta}})
    else:
        extra["rope_theta"] = theta
    if family == "smollm3":
        extra["no_rope_layers"] = [draw(st.sampled_from([0, 1])) for _ in range(2)]
    if family in ("phi3", "smollm3"):
        extra["pad_token_id"] = 0
    cfg_cls, model_cls = FAMILIES[family]
    config = cfg_cls(vocab_size=97, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                     max_position_embeddings=256, tie_word_embeddings=draw(st.booleans()), **extra)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _ids(model, t: int = 12) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, t), generator=torch.Generator().manual_seed(3))


@SETTINGS
@given(model=configs())
def test_exact_conversion_is_the_source(model):
    ids = _ids(model)
    tol = reference_tolerance(model, ids)
    conv = convert(model, ExactConfig(), progress=False)
    with torch.no_grad():
        diff = (conv(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= min(50 * tol, 1e-4)
    rec = record_of(conv)
    values = [d["kv_lora_rank"] + d["qk_rope_head_dim"] for d in rec["layers"]]
    assert all(v == rec["source"]["kv_values_per_token_per_layer"] for v in values)  # full budget: same size


@SETTINGS
@given(model=configs(), budget=st.sampled_from([0.75, 0.5, 0.25]))
def test_reduced_budget_invariants(model, budget):
    """Any budget: the cache holds what was asked, absorbed == expanded, cached decode == uncached."""
    conv = convert(model, SVDConfig(kv_budget=budget), progress=False)
    rec = record_of(conv)
    src = rec["source"]["kv_values_per_token_per_layer"]
    # per layer: NoPE layers (SmolLM3) put their whole budget in the latent, capped at the rank the input allows
    per_layer = [d["kv_lora_rank"] + d["qk_rope_head_dim"] + d["key_scales"] for d in rec["layers"]]
    assert all(v <= round(budget * src) and v < src for v in per_layer)
    ids = _ids(model)
    with torch.no_grad():
        a = conv(ids, mla_path="expanded").logits
        b = conv(ids, mla_path="absorbed").logits
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, a.abs().max().item())
        cache = LatentCache(conv)
        conv(ids[:, :-1], cache=cache)
        step = conv(ids[:, -1:], cache=cache).logits[:, -1]
    assert (step - a[:, -1]).abs().max().item() <= 1e-4 * max(1.0, a.abs().max().item())
    # QK-norm's per-token key scales are cached, so they are counted in the budget and in the bytes
    assert cache.bytes_per_token() == sum(per_layer) * 4  # fp32
    assert cache.nbytes() == held_bytes(conv, batch=ids.shape[0], tokens=ids.shape[1])  # windows keep window - 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    from latentkv.errors import LatentKVError

    config_cls, model_cls = FAMILIES["llama"]
    model = model_cls(config_cls(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = bad
    with pytest.raises(LatentKVError, match="layer 1.*k_proj.*not finite"):
        convert(model, SVDConfig(kv_budget=0.5), progress=False)
