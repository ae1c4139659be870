"""Thin module surgery for conversion: read one source layer, compute its MLA weights, install them."""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from ..errors import LatentKVError
from ..families import SourceAttention, SourceLayout, attention_layers, read_attention, rotates
from ..runtime.install import install_layer
from ..runtime.mla import MLADims
from .converters import converter_for
from .dims import latent_cap


def layer_dims(layout: SourceLayout, sd: dict, src: SourceAttention, latent_norm: bool = False) -> MLADims:
    """The MLADims of a converted layer's state dict (DeepSeek-V3 names)."""
    p = sd["rope_freq_idx"].numel() * 2
    r = sd["kv_a_proj_with_mqa.weight"].shape[0] - p
    qk = sd["q_head_map"].shape[1] if "q_head_map" in sd else sd["q_proj.weight"].shape[0] // layout.num_heads
    norm = {} if src.qk_norm is None else dict(
        qk_norm=src.qk_norm.mode, key_scales=layout.key_scales, src_head_dim=layout.head_dim,
        src_kv_heads=layout.num_kv_heads, k_src_bias="k_src_proj.bias" in sd, qk_norm_eps=src.qk_norm.eps)
    if src.qk_norm is None and "q_head_map" in sd:  # keys.factored_query
        norm = dict(q_factored=True, src_head_dim=layout.head_dim)
    return MLADims(
        hidden_size=layout.hidden_size, num_heads=layout.num_heads, kv_lora_rank=r, qk_rope_head_dim=p,
        qk_nope_head_dim=qk - p, v_head_dim=layout.head_dim, softmax_scale=src.softmax_scale,
        q_bias="q_proj.bias" in sd or "q_src_proj.bias" in sd, kv_a_bias="kv_a_proj_with_mqa.bias" in sd,
        o_bias="o_proj.bias" in sd, latent_norm=latent_norm, rms_norm_eps=layout.rms_norm_eps, **norm,
    )


def convert_attention(model, i: int, source_attn, layout: SourceLayout, config, dims, stats) -> MLADims:
    """Compute MLA weights from `source_attn` (layer i's source attention) and install them as layer i
    of `model` -> the new layer's dims."""
    src, layout = read_attention(source_attn), layout.for_layer(i)
    if not rotates(layout):  # a NoPE layer (SmolLM3): nothing to rotate, every cache value goes to the latent
        dims = (min(sum(dims), latent_cap(layout, "high", 0)), 0)
    with torch.no_grad():
        sd = converter_for(config).layer(src.at_least_float32(), layout, config, dims, stats)
    return install_layer(model, i, layer_dims(layout, sd, src), sd)


def convert_layer(model, new, i: int, layout: SourceLayout, config, dims, stats) -> MLADims:
    """Compute layer i's MLA weights from `model` and install them into `new`."""
    return convert_attention(new, i, attention_layers(model)[i], layout, config, dims, stats)


def check_finite(model) -> None:
    """A NaN/Inf in a source attention weight would spread through every factorization silently."""
    for i, attn in enumerate(attention_layers(model)):
        check_finite_layer(i, attn)


def check_finite_layer(i: int, attn) -> None:
    for name, p in attn.named_parameters():
        if not torch.isfinite(p).all():
            raise LatentKVError(f"source weights of layer {i} ({name}) are not finite (NaN/Inf): the "
                                "checkpoint is corrupt or was saved in a dtype that overflowed; re-download it")


def per_layer(dims, num_layers: int) -> list[tuple[int, int]]:
    """(r, p) for every layer from one pair or a per-layer list."""
    return list(dims) if isinstance(dims, list) else [tuple(dims)] * num_layers


def convert_oneshot(model, layout: SourceLayout, config, dims, stats: list | None = None, progress: bool = False,
                    desc: str = "convert (one-shot)"):
    """A converted copy of `model`, every layer from the source's own weights (and statistics).
    dims: (kv_lora_rank, qk_rope_head_dim) for all layers, or a list with one pair per layer."""
    new = copy.deepcopy(model)
    for i, d in enumerate(tqdm(per_layer(dims, layout.num_layers), desc=desc, disable=not progress)):
        convert_layer(model, new, i, layout, config, d, None if stats is None else stats[i])
    return new
