"""`convert(model, config)`: dispatch on the config type, compute new weights, swap modules."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from . import __version__
from .errors import LatentKVError
from .families import (SourceAttention, SourceLayout, attention_layers, read_attention, sliding_window,
                       source_layout)
from .layers import CONVERTERS
from .methods import LowRankConfig, config_to_dict, max_rank, rope_grid
from .mla import MLAAttention, MLADims

FORMAT_VERSION = 1


def check_dims(layout: SourceLayout, kv_lora_rank: int, qk_rope_head_dim: int, rope: str = "high") -> None:
    """One-line errors for ranks that cannot fit this model under the given RoPE strategy."""
    p, r = qk_rope_head_dim, kv_lora_rank
    step, most_rope = rope_grid(layout, rope)
    if p < 0 or p % step or p > most_rope:
        what = "2*num_key_value_heads" if step > 2 else "2"
        raise LatentKVError(f"--qk-rope-head-dim {p} does not fit: with --rope {rope} it must be a multiple of {what} "
                            f"= {step} between 0 and {most_rope}")
    most = max_rank(layout, p, shared_nope=rope != "high")
    if not 1 <= r <= most:
        raise LatentKVError(f"--kv-lora-rank {r} does not fit: with --qk-rope-head-dim {p} it must be between 1 and "
                            f"{most} (rank of the stacked non-rotated keys and values)")


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


def install_layer(model, i: int, dims: MLADims, state: dict | None = None) -> MLADims:
    """Swap layer i's `self_attn` for an MLAAttention (in place); load `state` if given."""
    layer = model.model.layers[i]
    ref = next(layer.self_attn.parameters())
    window = sliding_window(model.config, layer.self_attn, i)
    attn = MLAAttention(dims, model.config, i, window).to(device=ref.device, dtype=ref.dtype)
    if state is not None:
        attn.load_state_dict(state)
    layer.self_attn = attn
    return dims


def install_mla(model, dims: list[MLADims], state: list[dict] | None = None) -> None:
    for i, d in enumerate(dims):
        install_layer(model, i, d, None if state is None else state[i])


def convert_layer(model, new, i: int, layout: SourceLayout, config, dims, stats) -> MLADims:
    """Compute layer i's MLA weights from `model` and install them into `new`."""
    src = read_attention(attention_layers(model)[i])
    with torch.no_grad():
        sd = CONVERTERS[type(config)](_float32(src), layout, config, dims, stats)
    return install_layer(new, i, layer_dims(layout, sd, src), sd)


def convert(model, config, *, tokenizer=None, calib_ids: torch.Tensor | None = None, calib_cache: dict | None = None,
            progress: bool = True):
    """Return a converted copy of `model` (the source is untouched); the record is in `config.latentkv`.

    Calibrated methods need `tokenizer` (to read `config.calib`) or ready `calib_ids` (N, T).
    `calib_cache`: a dict shared by calls on the same model and calib_ids, so one-shot statistics
    are collected once (sweeps).
    """
    if type(config) not in CONVERTERS:
        raise LatentKVError(f"unknown conversion config {type(config).__name__}; known: "
                            + ", ".join(c.__name__ for c in CONVERTERS))
    layout = source_layout(model.config)
    check_finite(model)
    start = time.perf_counter()
    if isinstance(config, LowRankConfig):
        from .calibrated import convert_calibrated

        new, choice = convert_calibrated(model, layout, config, tokenizer, calib_ids, progress, calib_cache)
    else:
        dims = config.dims(layout)
        if config.method != "exact":  # the exact embedding fits any model by construction
            check_dims(layout, *dims)
        new, choice = copy.deepcopy(model), None
        for i in tqdm(range(layout.num_layers), desc=f"convert ({config.method})", disable=not progress):
            convert_layer(model, new, i, layout, config, dims, None)
    layers = [layer.self_attn.dims for layer in new.model.layers]
    new.config.latentkv = conversion_record(model, layout, config, layers, time.perf_counter() - start, choice)
    return new


def check_finite(model) -> None:
    """A NaN/Inf in a source attention weight would spread through every factorization silently."""
    for i, attn in enumerate(attention_layers(model)):
        check_finite_layer(i, attn)


def check_finite_layer(i: int, attn) -> None:
    for name, p in attn.named_parameters():
        if not torch.isfinite(p).all():
            raise LatentKVError(f"source weights of layer {i} ({name}) are not finite (NaN/Inf): the "
                                "checkpoint is corrupt or was saved in a dtype that overflowed; re-download it")


def _float32(src: SourceAttention) -> SourceAttention:
    """Factorize in fp32 at least (bf16 SVD is not available and loses the exact embedding)."""
    up = lambda t: None if t is None else t.float()  # noqa: E731
    return SourceAttention(*(up(getattr(src, f)) for f in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")),
                           src.softmax_scale)


def conversion_record(model, layout: SourceLayout, config, dims: list[MLADims], seconds: float,
                      choice: dict | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "latentkv_version": __version__,
        "conversion": config_to_dict(config),
        "source": {"name_or_path": getattr(model.config, "_name_or_path", ""), **asdict(layout),
                   "kv_values_per_token_per_layer": layout.kv_values_per_token},
        "layers": [d.to_dict() for d in dims],
        "split_search": choice,
        "convert_seconds": round(seconds, 3),
    }


def record_of(model) -> dict | None:
    """The conversion record of a converted model, None for a source model."""
    return getattr(model.config, "latentkv", None)
