"""`convert(model, config)`: dispatch on the config type, compute new weights, swap modules."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from . import __version__
from .errors import LatentKVError
from .factorize import RopeSplit, assemble, factorize_identity, factorize_svd, split_rope, stack_nope_kv
from .families import SourceAttention, SourceLayout, attention_layers, read_attention, source_layout
from .methods import ExactConfig, SVDConfig, config_to_dict
from .mla import MLAAttention, MLADims

FORMAT_VERSION = 1


def check_dims(layout: SourceLayout, kv_lora_rank: int, qk_rope_head_dim: int) -> None:
    """One-line errors for ranks that cannot fit this model (S_high keeps pairs uniformly per KV head)."""
    g, d = layout.num_kv_heads, layout.head_dim
    p, r = qk_rope_head_dim, kv_lora_rank
    if p < 0 or p % (2 * g) or p > g * d:
        raise LatentKVError(f"--qk-rope-head-dim {p} does not fit: it must be a multiple of 2*num_key_value_heads "
                            f"= {2 * g} between 0 and {g * d} (num_key_value_heads*head_dim)")
    nope = d - p // g
    most = min(g * (nope + d), layout.hidden_size)
    if not 1 <= r <= most:
        raise LatentKVError(f"--kv-lora-rank {r} does not fit: with --qk-rope-head-dim {p} it must be between 1 and "
                            f"{most} (rank of the stacked non-rotated keys and values)")


def _exact_layer(src: SourceAttention, layout: SourceLayout, config: ExactConfig) -> dict:
    rank, _ = config.dims(layout)
    parts = split_rope(src, layout, RopeSplit.high_frequencies(layout, layout.head_dim // 2))
    w, b = stack_nope_kv(parts, src)  # every key dim is rotated, so Y = V
    return assemble(layout, src, parts, *factorize_identity(w, b, rank))


def _svd_layer(src: SourceAttention, layout: SourceLayout, config: SVDConfig) -> dict:
    rank, rope = config.dims(layout)
    parts = split_rope(src, layout, RopeSplit.high_frequencies(layout, rope // (2 * layout.num_kv_heads)))
    w, b = stack_nope_kv(parts, src)
    return assemble(layout, src, parts, *factorize_svd(w, b, rank))


# config type -> pure per-layer function (SourceAttention, SourceLayout, config) -> MLA state dict
CONVERTERS = {ExactConfig: _exact_layer, SVDConfig: _svd_layer}


def layer_dims(layout: SourceLayout, sd: dict, src: SourceAttention, latent_norm: bool = False) -> MLADims:
    p = sd["rope_freq_idx"].numel() * 2
    r = sd["kv_a_proj_with_mqa.weight"].shape[0] - p
    qk = sd["q_proj.weight"].shape[0] // layout.num_heads
    return MLADims(
        hidden_size=layout.hidden_size, num_heads=layout.num_heads, kv_lora_rank=r, qk_rope_head_dim=p,
        qk_nope_head_dim=qk - p, v_head_dim=layout.head_dim, softmax_scale=src.softmax_scale,
        q_bias="q_proj.bias" in sd, kv_a_bias="kv_a_proj_with_mqa.bias" in sd, o_bias="o_proj.bias" in sd,
        latent_norm=latent_norm, rms_norm_eps=layout.rms_norm_eps,
    )


def install_mla(model, dims: list[MLADims], state: list[dict] | None = None) -> None:
    """Swap every `self_attn` for an MLAAttention (in place); load `state` if given."""
    for i, layer in enumerate(model.model.layers):
        old = layer.self_attn
        ref = next(old.parameters())
        attn = MLAAttention(dims[i], model.config, i).to(device=ref.device, dtype=ref.dtype)
        if state is not None:
            attn.load_state_dict(state[i])
        layer.self_attn = attn


def convert(model, config, progress: bool = True):
    """Return a converted copy of `model` (the source is untouched); the record is in `config.latentkv`."""
    if type(config) not in CONVERTERS:
        raise LatentKVError(f"unknown conversion config {type(config).__name__}; known: "
                            + ", ".join(c.__name__ for c in CONVERTERS))
    layout = source_layout(model.config)
    check_dims(layout, *config.dims(layout))
    start = time.perf_counter()
    states, dims = [], []
    for attn in tqdm(attention_layers(model), desc=f"convert ({config.method})", disable=not progress):
        src = read_attention(attn)
        with torch.no_grad():
            sd = CONVERTERS[type(config)](_float32(src), layout, config)
        dims.append(layer_dims(layout, sd, src))
        states.append(sd)
    new = copy.deepcopy(model)
    install_mla(new, dims, states)
    new.config.latentkv = conversion_record(model, layout, config, dims, time.perf_counter() - start)
    return new


def _float32(src: SourceAttention) -> SourceAttention:
    """Factorize in fp32 at least (bf16 SVD is not available and loses the exact embedding)."""
    up = lambda t: None if t is None else t.float()  # noqa: E731
    return SourceAttention(*(up(getattr(src, f)) for f in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")),
                           src.softmax_scale)


def conversion_record(model, layout: SourceLayout, config, dims: list[MLADims], seconds: float) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "latentkv_version": __version__,
        "conversion": config_to_dict(config),
        "source": {"name_or_path": getattr(model.config, "_name_or_path", ""), **asdict(layout),
                   "kv_values_per_token_per_layer": layout.kv_values_per_token},
        "layers": [d.to_dict() for d in dims],
        "convert_seconds": round(seconds, 3),
    }


def record_of(model) -> dict | None:
    """The conversion record of a converted model, None for a source model."""
    return getattr(model.config, "latentkv", None)
