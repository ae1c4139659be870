"""Source families we convert, and the one table from their names to DeepSeek-V3's."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .errors import LatentKVError

# model_type -> human name. SmolLM/SmolLM2 are Llama checkpoints (model_type "llama").
SUPPORTED_FAMILIES = {"llama": "Llama/SmolLM", "mistral": "Mistral", "qwen2": "Qwen2", "gemma2": "Gemma-2"}

# The one table from source names to DeepSeek-V3's. Attention is recomputed, not renamed: each source
# projection's rows land in the MLA modules listed (q_proj: per head qk_nope_head_dim | qk_rope_head_dim
# rows; k_proj: rotated rows -> the shared k_pe of kv_a_proj_with_mqa, the rest -> the latent and W_uk of
# kv_b_proj; v_proj: the latent and W_uv). `read_attention` reads the source modules by these keys.
SOURCE_TO_MLA = {
    "q_proj": ("q_proj",),
    "k_proj": ("kv_a_proj_with_mqa", "kv_b_proj"),
    "v_proj": ("kv_a_proj_with_mqa", "kv_b_proj"),
    "o_proj": ("o_proj",),
}
# Every other tensor (embeddings, norms, MLP, lm_head) keeps its name: Llama/Mistral/Qwen2 and a dense
# DeepSeek-V3 layer share them. Checkpoint tensors of decoder layer i start with f"{LAYER_PREFIX}{i}.".
LAYER_PREFIX, EMBED_PREFIX = "model.layers.", "model.embed"

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

    def to_record(self, name_or_path: str) -> dict:
        """The `source` entry of a conversion record."""
        return {"name_or_path": name_or_path, **asdict(self), "kv_values_per_token_per_layer": self.kv_values_per_token}


def rope_type(config) -> str:
    """The source's RoPE scaling type ('default', 'llama3', ...), from either config spelling."""
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
    rope = rope_type(config)
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
    rope = rope_type(config)
    if rope != "default":
        return ROPE_INIT_FUNCTIONS[rope](config, "cpu")[0].double()
    params = getattr(config, "rope_parameters", None) or {}
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


def plain_frequencies(config) -> int:
    """How many of the fastest source frequencies follow the plain schedule theta^(-2i/d) (all of them
    for default RoPE; llama3 and YaRN rescale only the slow end). Engines' DeepSeek-V3 rotary replaces
    any non-default type with its own YaRN, so exports keep to these."""
    got = rope_frequencies(config)
    params = getattr(config, "rope_parameters", None) or {}
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    plain = 1.0 / base ** (torch.arange(0, 2 * got.numel(), 2, dtype=torch.float64) / (2 * got.numel()))
    same = torch.isclose(got, plain, rtol=1e-6, atol=0)
    return int(same.numel() if same.all() else same.int().argmin())


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

    def at_least_float32(self) -> SourceAttention:
        """The same weights in fp32 at least: bf16 has no SVD, and the exact embedding needs fp32."""
        up = lambda t: None if t is None else t.float()  # noqa: E731
        return SourceAttention(*(up(getattr(self, f.name)) for f in fields(self) if f.name != "softmax_scale"),
                               self.softmax_scale)


def attention_layers(model) -> list:
    """The `self_attn` modules of a decoder-only HF model, in layer order."""
    return [layer.self_attn for layer in model.model.layers]


def read_attention(attn) -> SourceAttention:
    """The weights of a source `self_attn`, read by the names in SOURCE_TO_MLA."""
    lins = [getattr(attn, name) for name in SOURCE_TO_MLA]  # q, k, v, o
    weights = [lin.weight.detach() for lin in lins]
    biases = [None if lin.bias is None else lin.bias.detach() for lin in lins]
    return SourceAttention(*weights, *biases, float(attn.scaling))


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
