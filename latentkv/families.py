"""Source families we convert, and the one table from their names to DeepSeek-V3's."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields, replace

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .errors import LatentKVError

# model_type -> human name. SmolLM/SmolLM2 are Llama checkpoints (model_type "llama").
SUPPORTED_FAMILIES = {"llama": "Llama/SmolLM", "mistral": "Mistral", "qwen2": "Qwen2", "gemma2": "Gemma-2",
                      "qwen3": "Qwen3", "gemma3_text": "Gemma-3", "olmo2": "OLMo-2", "phi3": "Phi-3",
                      "smollm3": "SmolLM3"}
# QK-norm families -> where their q/k RMSNorm acts: "head" (each head's d dims, one weight shared by
# heads: Qwen3, Gemma-3) or "proj" (the whole q or k projection: OLMo-2). See `QKNorm`.
QK_NORM = {"qwen3": "head", "gemma3_text": "head", "olmo2": "proj"}

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
REFUSED_FAMILIES = {
    "qwen3_moe": "is a mixture-of-experts model, which latentkv has not been tested on (its attention is Qwen3's)",
    "gemma3": "is Gemma-3's multimodal wrapper; convert its text model (model_type gemma3_text, e.g. "
              "google/gemma-3-270m or gemma3-270m)",
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
    inv_freq: tuple[float, ...]  # (d/2,) RoPE frequency of each pair, scaling included (layer 0's)
    qk_norm: str | None = None  # QK_NORM's "head" | "proj", None without QK-norm
    # per layer, when layers rotate at different frequencies (Gemma-3: local vs global); else ()
    layer_inv_freq: tuple[tuple[float, ...], ...] = ()

    @property
    def kv_values_per_token(self) -> int:
        """Cache values per token per layer in the source: keys and values of every KV head."""
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def key_scales(self) -> int:
        """Per-token key-norm scales the latent cache holds beside c_kv and k_pe: one per KV head
        ("head" QK-norm), one per token ("proj"), none without QK-norm."""
        return {"head": self.num_kv_heads, "proj": 1}.get(self.qk_norm, 0)

    def for_layer(self, i: int) -> SourceLayout:
        """This layout with layer i's RoPE frequencies."""
        return replace(self, inv_freq=self.layer_inv_freq[i]) if self.layer_inv_freq else self

    def to_record(self, name_or_path: str) -> dict:
        """The `source` entry of a conversion record."""
        rec = {k: v for k, v in asdict(self).items() if k != "layer_inv_freq"}
        return {"name_or_path": name_or_path, **rec, "kv_values_per_token_per_layer": self.kv_values_per_token}


def layer_rope_types(config) -> list[str | None]:
    """Per layer, the key of its own RoPE parameters (Gemma-3: 'sliding_attention' / 'full_attention'),
    or None for every layer when the model has one set."""
    params = getattr(config, "rope_parameters", None) or {}
    types = getattr(config, "layer_types", None)
    if types and params and all(t in params for t in set(types)):
        return list(types)
    return [None] * config.num_hidden_layers


def rope_params(config, layer_type: str | None = None) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params[layer_type] if layer_type is not None else params


def rope_type(config, layer_type: str | None = None) -> str:
    """The source's RoPE scaling type ('default', 'llama3', ...), from either config spelling."""
    params = rope_params(config, layer_type)
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
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise LatentKVError(f"{mt} rotates only {config.partial_rotary_factor:.0%} of each head's dims (partial "
                            "rotary), which latentkv does not convert yet; supported: fully rotary heads")
    for rope in {rope_type(config, t) for t in layer_rope_types(config)}:
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
        inv_freq=tuple(rope_frequencies(config, layer_rope_types(config)[0]).tolist()),
        qk_norm=QK_NORM.get(config.model_type),
        layer_inv_freq=per_layer_frequencies(config),
    )


def per_layer_frequencies(config) -> tuple[tuple[float, ...], ...]:
    """Every layer's (d/2,) frequencies when layers rotate differently (Gemma-3's local and global bases;
    SmolLM3's NoPE layers, which do not rotate: frequency 0), else ()."""
    types = layer_rope_types(config)
    rotates = getattr(config, "no_rope_layers", None) or [1] * config.num_hidden_layers
    if len(set(types)) < 2 and all(rotates):
        return ()
    freqs = {t: rope_frequencies(config, t) for t in set(types)}
    return tuple(tuple((freqs[t] * bool(r)).tolist()) for t, r in zip(types, rotates))


def rotates(layout: SourceLayout) -> bool:
    """False for a layout (of one layer) whose keys never rotate (a NoPE layer)."""
    return any(layout.inv_freq)


def rope_frequencies(config, layer_type: str | None = None) -> torch.Tensor:
    """(d/2,) inverse frequencies exactly as the source model rotates (llama3 scaling applied);
    `layer_type`: whose parameters, for models with one set per layer type (Gemma-3)."""
    rope = rope_type(config, layer_type)
    if rope != "default":
        extra = {} if layer_type is None else {"layer_type": layer_type}
        return ROPE_INIT_FUNCTIONS[rope](config, "cpu", **extra)[0].double()
    params = rope_params(config, layer_type)
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
class QKNorm:
    """A QK-norm source's norms. The source computes q = w_q_norm * n(W_q x + b_q), n(u) = u / rms(u)
    over each head's d dims ("head": Qwen3, Gemma-3) or the whole projection ("proj": OLMo-2), and k
    alike. SourceAttention's w_q/w_k hold the weight-folded linear parts diag(w_norm) W, which the
    factorizations see; the raw projections here compute the per-token rms at run time.

    q_weight (d,) | (H*d,), k_weight (d,) | (G*d,): effective weights (Gemma's 1 + w already added);
    w_q (H*d, D), w_k (G*d, D), biases (out,) or None.
    """

    mode: str
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
    w_q: torch.Tensor
    b_q: torch.Tensor | None
    w_k: torch.Tensor
    b_k: torch.Tensor | None

    def at_least_float32(self) -> QKNorm:
        return replace(self, **{f.name: _up(getattr(self, f.name)) for f in fields(self)
                                if f.name not in ("mode", "eps")})


@dataclass(frozen=True)
class SourceAttention:
    """One source layer's attention weights (nn.Linear layout: out x in).

    w_q (H*d, D), w_k (G*d, D), w_v (G*d, D), w_o (D, H*d); biases (out,) or None. With QK-norm
    (`qk_norm`), w_q/w_k/b_q/b_k are the norm-weight-folded linear parts (see QKNorm).
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
    qk_norm: QKNorm | None = None

    def at_least_float32(self) -> SourceAttention:
        """The same weights in fp32 at least: bf16 has no SVD, and the exact embedding needs fp32."""
        ups = {f.name: _up(getattr(self, f.name)) for f in fields(self) if f.name not in ("softmax_scale", "qk_norm")}
        return replace(self, **ups, qk_norm=self.qk_norm and self.qk_norm.at_least_float32())


def _up(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def attention_layers(model) -> list:
    """The `self_attn` modules of a decoder-only HF model, in layer order."""
    return [layer.self_attn for layer in model.model.layers]


def read_attention(attn) -> SourceAttention:
    """The weights of a source `self_attn`, read by the names in SOURCE_TO_MLA (Phi-3's fused
    `qkv_proj` is split into its q, k, v rows)."""
    if hasattr(attn, "qkv_proj"):
        q_rows = attn.config.num_attention_heads * attn.head_dim
        kv_rows = (attn.qkv_proj.weight.shape[0] - q_rows) // 2
        split = lambda t: (None,) * 3 if t is None else t.detach().split([q_rows, kv_rows, kv_rows])  # noqa: E731
        o_bias = attn.o_proj.bias
        weights = [*split(attn.qkv_proj.weight), attn.o_proj.weight.detach()]
        biases = [*split(attn.qkv_proj.bias), None if o_bias is None else o_bias.detach()]
    else:
        lins = [getattr(attn, name) for name in SOURCE_TO_MLA]  # q, k, v, o
        weights = [lin.weight.detach() for lin in lins]
        biases = [None if lin.bias is None else lin.bias.detach() for lin in lins]
    src = SourceAttention(*weights, *biases, float(attn.scaling))
    return src if getattr(attn, "k_norm", None) is None else fold_qk_norm(src, attn)


def fold_qk_norm(src: SourceAttention, attn) -> SourceAttention:
    """`src` with the q/k norm weights folded into w_q/w_k (and biases), the raw parts in `qk_norm`."""
    q_w, eps = norm_weight(attn.q_norm), norm_eps(attn.k_norm)
    k_w = norm_weight(attn.k_norm)
    mode = "head" if q_w.numel() < src.w_q.shape[0] else "proj"  # (MQA's key norm spans its projection either way)
    rows = lambda w, n: w.repeat(n // w.numel()).to(src.w_q.dtype)  # noqa: E731  (out,) scale of each row
    qs, ks = rows(q_w, src.w_q.shape[0]), rows(k_w, src.w_k.shape[0])
    scaled = lambda w, b, r: (w * r[:, None], None if b is None else b * r)  # noqa: E731
    (w_q, b_q), (w_k, b_k) = scaled(src.w_q, src.b_q, qs), scaled(src.w_k, src.b_k, ks)
    norm = QKNorm(mode, q_w, k_w, eps, src.w_q, src.b_q, src.w_k, src.b_k)
    return replace(src, w_q=w_q, b_q=b_q, w_k=w_k, b_k=b_k, qk_norm=norm)


def norm_weight(norm) -> torch.Tensor:
    """An RMSNorm's effective elementwise weight: w, or Gemma's 1 + w, told apart by applying the norm
    to a vector of ones (rms 1, so it returns the weight over sqrt(1 + eps)); exact in fp64 even though
    the norms compute in fp32. A norm of neither form gets the measured weight."""
    w = norm.weight.detach().double()
    probe = copy.deepcopy(norm).double()
    with torch.no_grad():
        out = probe(torch.ones(1, w.numel(), dtype=torch.float64))[0] * (1 + norm_eps(norm)) ** 0.5
    for form in (w, 1 + w):
        if torch.allclose(out, form, rtol=1e-5, atol=1e-6):
            return form
    return out


def norm_eps(norm) -> float:
    return float(getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6))


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
