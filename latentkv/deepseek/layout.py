"""The DeepSeek-V3 layout, both ways: RoPE rows (engines rotate interleaved pairs, we keep transformers'
half-split ones), the rope_parameters that reproduce the source's frequencies, the engine config,
and the kernel shapes fast MLA backends take. `export` writes with it, `reader` reads with it.
"""

from __future__ import annotations

import math
import warnings

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

from ..conversion.configs import PRESETS
from ..conversion.rope import frequency_runs
from ..errors import LatentKVError
from ..families import plain_frequencies, rope_frequencies, rope_type

FAST_KERNEL_DIMS = tuple(PRESETS.values())  # (kv_lora_rank, qk_rope_head_dim) FlashMLA / FlashInfer / CUTLASS accept


def rope_parameters(model, freq_idx: torch.Tensor) -> dict:
    """The rope_parameters that make a DeepSeek-V3 rotary of p = 2m dims reproduce the source frequencies
    `freq_idx` (m,) of our rope pairs: 0..a-1 (the a fastest, once) then either 0..c-1 (c <= a, a second
    component) or a+s..m-1+s (s skipped). rope_theta' = theta^(p/d) gives the source's schedule; for the
    second run, YaRN with factor theta^(-2a/d) < 1 turns engine pair j >= a into frequency j - a, with
    factor theta^(2s/d) > 1 into j + s; beta_fast = beta_slow puts the step between a - 1 and a (nothing
    in between). Refuses what that cannot express, checked against transformers' own rotary."""
    m, src = freq_idx.numel(), model.config
    params = dict(getattr(src, "rope_parameters", None) or {})
    kind = rope_type(src)
    theta = float(params.get("rope_theta", getattr(src, "rope_theta", 10000.0)))
    d = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    engine_idx = freq_idx[pair_order(freq_idx)]
    run = frequency_runs(engine_idx.tolist())
    if run is None or run[0] == 0:
        raise LatentKVError(f"rope frequencies {engine_idx.tolist()} are not the fastest ones (at most twice each, or "
                            "with one run skipped); DeepSeek-V3 cannot run them: convert with --rope rorope-export "
                            "(or --target deepseek_v3)")
    a, shift = run
    # plain frequencies only: the schedule every engine computes the same
    if int(engine_idx.max()) < plain_frequencies(src):
        params = {"rope_type": "default", "rope_theta": theta ** (2 * m / d)}
        if a < m:
            params.update(_second_run(params["rope_theta"], theta, d, 2 * m, a, shift, src.max_position_embeddings))
    elif a < m:
        raise LatentKVError(f"a second rope run needs YaRN, which cannot stack on the source's rescaled {kind} "
                            f"frequencies; convert with fewer rope dims or --rope-slot0 {m}")
    else:
        params.update(rope_type=kind, rope_theta=theta ** (2 * m / d))
        warnings.warn(f"the export keeps {kind}-rescaled RoPE frequencies: transformers runs them exactly, but vLLM "
                      "and SGLang replace any non-default rope type with their DeepSeek YaRN for MLA; keep "
                      f"qk_rope_head_dim <= {2 * plain_frequencies(src)} for an export every engine runs", stacklevel=2)
    got = _engine_frequencies(params, 2 * m, src.max_position_embeddings)
    want = rope_frequencies(src).float()[engine_idx]
    if not torch.allclose(got, want, rtol=1e-5, atol=0):
        raise LatentKVError(f"the source's {kind} RoPE frequencies cannot be expressed for qk_rope_head_dim {2 * m} "
                            f"with {a} first components; DeepSeek-V3 cannot run this conversion")
    return params


# YaRN at factor > 1 scales the softmax by mscale(factor, mscale_all_dim)^2 in every engine (transformers'
# yarn_apply_mscale, vLLM's and SGLang's DeepSeek attention) and cos/sin by the ratio mscale(factor,
# mscale) / mscale(factor, mscale_all_dim) = 1 when the two are equal. Equal values that make the softmax
# factor exactly 2 let the export fold 1/2 into the query, a power of two that no dtype rounds.
SKIP_SOFTMAX_FACTOR = 2.0


def _second_run(engine_theta: float, theta: float, d: int, p: int, a: int, shift: int, max_positions: int) -> dict:
    """YaRN parameters under which engine pair j >= a rotates at source frequency j + shift."""
    factor = theta ** (2 * shift / d)
    original = max_positions / factor  # engines size their cos/sin tables by original * factor

    def rotations(x: float) -> float:  # inverse of YaRN's correction dim: the beta that puts it at x
        return original / (2 * math.pi) * math.exp(-2 * x * math.log(engine_theta) / p)

    beta = rotations(a - 0.5)  # floor -> a - 1, ceil -> a: pairs < a extrapolate, pairs >= a interpolate
    mscale = (math.sqrt(SKIP_SOFTMAX_FACTOR) - 1) / (0.1 * math.log(factor)) if factor > 1 else 1.0
    return dict(rope_type="yarn", factor=factor, original_max_position_embeddings=original, beta_fast=beta,
                beta_slow=beta, mscale=mscale, mscale_all_dim=mscale if factor > 1 else 0.0)


def query_fold(rope: dict) -> float:
    """The factor the export multiplies the query by, undoing what the engines' YaRN softmax scale adds."""
    return 1 / SKIP_SOFTMAX_FACTOR if rope.get("factor", 1.0) > 1 else 1.0


def _engine_frequencies(params: dict, p: int, max_positions: int) -> torch.Tensor:
    """(p/2,) inv_freq exactly as transformers' DeepSeek-V3 rotary computes it from `params`."""
    cfg = DeepseekV3Config(hidden_size=64, num_attention_heads=1, qk_rope_head_dim=p, rope_parameters=dict(params),
                           max_position_embeddings=max_positions)
    return DeepseekV3RotaryEmbedding(cfg).inv_freq.float()


def interleave_order(freq_idx: torch.Tensor) -> torch.Tensor:
    """(p,) rows of our half-split rope block (pair k = rows k, k + m) in DeepSeek's interleaved order
    (pair j = rows 2j, 2j + 1), pairs sorted by frequency (fastest first), first components before
    second ones (a frequency's second occurrence goes to the second run, see `rope_parameters`)."""
    order, m = pair_order(freq_idx), freq_idx.numel()
    return torch.stack((order, order + m), 1).reshape(-1)


def pair_order(freq_idx: torch.Tensor) -> torch.Tensor:
    """(m,) our rope pairs in the engine's order: each frequency's first occurrence, fastest first, then
    the second occurrences, fastest first."""
    m = freq_idx.numel()
    seen = torch.tensor([int((freq_idx[:k] == freq_idx[k]).sum()) for k in range(m)], dtype=torch.long)
    return torch.argsort(seen * m + freq_idx)


def reorder_rope_rows(name: str, t: torch.Tensor, dims, order: torch.Tensor) -> torch.Tensor:
    """A query (per head: n nope rows, then p rope rows) or kv_a (r latent rows, then p rope rows)
    weight with its rope rows taken in `order`; any other tensor unchanged. Used both ways: to the
    engine's interleaved layout on export, back to ours on import."""
    n, p, h = dims.qk_nope_head_dim, dims.qk_rope_head_dim, dims.num_heads
    if name.endswith(("q_proj.weight", "q_b_proj.weight")):
        w = t.view(h, n + p, -1)
        return torch.cat((w[:, :n], w[:, n:][:, order]), 1).reshape(h * (n + p), -1)
    if name.endswith("kv_a_proj_with_mqa.weight"):
        return torch.cat((t[: dims.kv_lora_rank], t[dims.kv_lora_rank:][order]))
    return t


def engine_config(model, dims, rope: dict) -> dict:
    src = model.config
    cfg = DeepseekV3Config(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        moe_intermediate_size=src.intermediate_size, num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_heads,
        # dense model: every layer is below first_k_dense_replace, so no MoE is built
        n_shared_experts=1, n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=src.num_hidden_layers, routed_scaling_factor=1.0,
        kv_lora_rank=dims.kv_lora_rank, q_lora_rank=dims.q_lora_rank, qk_rope_head_dim=dims.qk_rope_head_dim,
        qk_nope_head_dim=dims.qk_nope_head_dim, v_head_dim=dims.v_head_dim, hidden_act="silu",
        max_position_embeddings=src.max_position_embeddings, rms_norm_eps=src.rms_norm_eps,
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)), rope_parameters=rope,
        rope_interleave=True, attention_bias=False, num_mtp_layers=0,
    )
    out = cfg.to_dict()
    out.update(architectures=["DeepseekV3ForCausalLM"], moe_layer_freq=1, num_nextn_predict_layers=0,
               dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
               # older readers (vLLM, SGLang) take RoPE from these two keys
               rope_theta=rope["rope_theta"],
               rope_scaling=None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"})
    return out


def kernel_warning(dims) -> str | None:
    if (dims.kv_lora_rank, dims.qk_rope_head_dim) in FAST_KERNEL_DIMS:
        return None
    shapes = " or ".join(f"{r}+{p}" for r, p in FAST_KERNEL_DIMS)
    return (f"kv_lora_rank {dims.kv_lora_rank} + qk_rope_head_dim {dims.qk_rope_head_dim} is not a shape the "
            f"fast MLA kernels (FlashMLA, FlashInfer, CUTLASS MLA) take ({shapes}); engines fall back to slower "
            "backends or may refuse it; `convert --preset flashmla|flashinfer` makes those shapes")
