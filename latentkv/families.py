"""Source families we convert, and the one table from their names to DeepSeek-V3's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LatentKVError

# model_type -> human name. SmolLM/SmolLM2 are Llama checkpoints (model_type "llama").
SUPPORTED_FAMILIES = {"llama": "Llama/SmolLM", "mistral": "Mistral", "qwen2": "Qwen2", "gemma2": "Gemma-2"}

# The only place source names meet DeepSeek-V3 names.
#   source attention weight / config field -> where it lands in the MLA layer
SOURCE_TO_MLA = {
    "q_proj": "q_proj (rows split into qk_nope_head_dim | qk_rope_head_dim per head)",
    "k_proj": "kv_a_proj_with_mqa (rotated rows -> shared k_pe) + kv_b_proj (non-rotated rows, W_uk)",
    "v_proj": "kv_a_proj_with_mqa (latent rows) + kv_b_proj (W_uv)",
    "o_proj": "o_proj",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "(absorbed into kv_lora_rank / qk_rope_head_dim)",
    "head_dim": "v_head_dim; qk_nope_head_dim + rotated pairs per head",
    "attention_bias": "q_proj.bias, kv_a_proj_with_mqa.bias",
    "query_pre_attn_scalar": "softmax_scale (Gemma-2: its ** -0.5, not head_dim ** -0.5)",
    "attn_logit_softcapping": "attn_logit_softcapping (read from the model config by MLAAttention)",
}

SUPPORTED_ROPE_TYPES = ("default", "llama3")

# Families refused on purpose, with the reason (model_type -> why).
_QK_NORM = ("applies a per-head RMSNorm to q and k between the projection and RoPE (QK-norm): the key "
            "is then not a linear function of the hidden state, so no latent factorization reproduces it, "
            "and MLA engines have no slot for that norm")
REFUSED_FAMILIES = {
    "qwen3": _QK_NORM, "qwen3_moe": _QK_NORM, "gemma3": _QK_NORM, "gemma3_text": _QK_NORM, "olmo2": _QK_NORM,
}


@dataclass(frozen=True)
class SourceLayout:
    """The attention shapes of a supported source model."""

    model_type: str
    hidden_size: int  # D
    num_heads: int  # H
    num_kv_heads: int  # G
    head_dim: int  # d
    num_layers: int
    rms_norm_eps: float
    inv_freq: tuple[float, ...]  # (d/2,) RoPE frequency of each pair, scaling included

    @property
    def kv_values_per_token(self) -> int:
        """Cache values per token per layer in the source: keys and values of every KV head."""
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def check_supported(config) -> None:
    """Raise a one-line error for any architecture or feature we cannot convert exactly."""
    mt = getattr(config, "model_type", None)
    if mt in REFUSED_FAMILIES:
        raise LatentKVError(f"cannot convert model_type {mt!r}: it {REFUSED_FAMILIES[mt]}; supported: "
                            f"{', '.join(SUPPORTED_FAMILIES.values())}")
    if mt not in SUPPORTED_FAMILIES:
        arch = (getattr(config, "architectures", None) or [mt])[0]
        names = ", ".join(SUPPORTED_FAMILIES.values())
        raise LatentKVError(f"unsupported architecture {arch!r} (model_type {mt!r}); supported: {names}")
    rope = _rope_type(config)
    if rope not in SUPPORTED_ROPE_TYPES:
        raise LatentKVError(f"unsupported RoPE scaling {rope!r} in {mt}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def source_layout(config) -> SourceLayout:
    check_supported(config)
    heads = config.num_attention_heads
    return SourceLayout(
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        num_layers=config.num_hidden_layers,
        rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6),
        inv_freq=tuple(rope_frequencies(config).tolist()),
    )


def rope_frequencies(config) -> torch.Tensor:
    """(d/2,) inverse frequencies exactly as the source model rotates (llama3 scaling applied)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = _rope_type(config)
    if rope != "default":
        return ROPE_INIT_FUNCTIONS[rope](config, "cpu")[0].double()
    params = getattr(config, "rope_parameters", None) or {}
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


@dataclass(frozen=True)
class SourceAttention:
    """One source layer's attention weights (nn.Linear layout: out x in).

    w_q (H*d, D), w_k (G*d, D), w_v (G*d, D), w_o (D, H*d); biases (out,) or None.
    """

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    b_q: torch.Tensor | None
    b_k: torch.Tensor | None
    b_v: torch.Tensor | None
    b_o: torch.Tensor | None
    softmax_scale: float


def attention_layers(model) -> list:
    """The `self_attn` modules of a decoder-only HF model, in layer order."""
    return [layer.self_attn for layer in model.model.layers]


def read_attention(attn) -> SourceAttention:
    def b(lin):
        return None if lin.bias is None else lin.bias.detach()

    return SourceAttention(
        attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), attn.v_proj.weight.detach(),
        attn.o_proj.weight.detach(), b(attn.q_proj), b(attn.k_proj), b(attn.v_proj), b(attn.o_proj),
        float(attn.scaling),
    )


def logit_softcap(config) -> float | None:
    """Gemma-2's tanh cap on attention scores (cap * tanh(s / cap)), applied after scaling; None elsewhere."""
    return getattr(config, "attn_logit_softcapping", None)


def embedding_scale(model) -> float:
    """What the model multiplies looked-up embeddings by (Gemma: sqrt(hidden_size)); 1 elsewhere."""
    return float(getattr(model.model.embed_tokens, "scalar_embed_scale", 1.0))


def sliding_window(config, attn, i: int) -> int | None:
    """Layer i's attention window (None: global). Qwen2 keeps it on the module, Mistral on the config,
    Gemma-style models in `layer_types`."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    types = getattr(config, "layer_types", None)
    if types:
        return getattr(config, "sliding_window", None) if types[i] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)
