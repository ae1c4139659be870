"""`convert(model, config)`: look up the config type's converter, compute new weights, swap modules."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from ..families import SourceLayout, source_layout
from ..record import make_record
from .allocate import allocate_search, allocate_spectrum
from .calibration import calibration_ids, calibration_record, held_out_nll, oneshot_stats, serving_windows, split_ids
from .configs import LowRankConfig, config_to_dict
from .converters import converter_for
from .dims import check_config, checked, fit_to_source, fixed_dims
from .latent_norm import add_latent_norm
from .output_refit import refit_outputs
from .rope import sample_windows
from .search import export_schedule, search_split
from .sequential import convert_sequential
from .surgery import check_finite, convert_oneshot
from .temperature import LOSSLESS, choose_temperature, fit_temperatures, scale_logits

log = logging.getLogger(__name__)


def convert(model, config, *, tokenizer=None, calib_ids: torch.Tensor | None = None, calib_cache: dict | None = None,
            progress: bool = True):
    """Return a converted copy of `model` (the source is untouched); the record is in `config.latentkv`.

    Calibrated methods need `tokenizer` (to read `config.calib`) or ready `calib_ids` (N, T).
    `calib_cache`: a dict shared by calls on the same model and calib_ids, so one-shot statistics
    are collected once (sweeps).
    """
    calibrated = converter_for(config).calibrated
    layout = source_layout(model.config)
    check_finite(model)
    config = fit_to_source(config, layout)
    check_config(config, layout)
    start = time.perf_counter()
    info = None
    if calibrated:
        if calib_ids is None:
            calib_ids, info = calibration_ids(tokenizer, config)
        new, choice, config = convert_calibrated(model, layout, config, calib_ids, progress, calib_cache, tokenizer)
    else:
        dims = checked(config, layout, fixed_dims(config, layout))
        new, choice = convert_oneshot(model, layout, config, dims, None, progress, f"convert ({config.method})"), None
    layers = [layer.self_attn.dims.to_dict() for layer in new.model.layers]
    log.debug("converted %d layers with %s: kv_lora_rank %s, qk_rope_head_dim %s", len(layers), config.method,
              sorted({d["kv_lora_rank"] for d in layers}), sorted({d["qk_rope_head_dim"] for d in layers}))
    source = layout.to_record(getattr(model.config, "_name_or_path", ""))
    new.config.latentkv = make_record(source, config_to_dict(config), layers, time.perf_counter() - start, choice)
    if calibrated:
        new.config.latentkv["calibration"] = calibration_record(calib_ids, info)
    return new


def convert_calibrated(model, layout: SourceLayout, config: LowRankConfig, ids: torch.Tensor, progress: bool,
                       cache: dict | None = None, tokenizer=None):
    """ids (N, T) calibration windows -> (converted model, the record's split_search entry or None, the
    config as applied: `rope` is the strategy the split search chose). `tokenizer` reads longer
    calibration windows to choose the attention temperature on (else the held-out ones)."""
    fit, held = split_ids(ids)
    oneshot = oneshot_stats(model, ids, cache, progress, attention=config.attn_moment > 0,
                            keep=sample_windows(config.rope, *config.rope_choices))
    choice = None
    dims = fixed_dims(config, layout)
    if dims is None:
        choice = search_split(model, layout, config, oneshot, held, progress)
        dims = (choice["kv_lora_rank"], choice["qk_rope_head_dim"])
        config = replace(config, rope=choice["rope"])  # the record names the strategy that won
    dims = checked(config, layout, dims)
    if config.rope == "rorope-export" and config.rope_slot0 is None:
        config = export_schedule(model, layout, config, dims[1], oneshot)
        choice = {**(choice or {}), "rope_slot0": config.rope_slot0, "rope_skip": config.rope_skip}
    if config.rank_allocation != "uniform":
        alloc = (allocate_spectrum(model, layout, config, dims, oneshot) if config.rank_allocation == "spectrum"
                 else allocate_search(model, layout, config, dims, oneshot, held, choice, progress))
        choice = {**(choice or {}), "allocation": alloc}
        dims = [tuple(d) for d in alloc["dims"]]
    if config.sequential:
        new = convert_sequential(model, layout, config, dims, fit, progress)
    else:
        new = convert_oneshot(model, layout, config, dims, oneshot, progress)
    if config.latent_norm:
        choice = {**(choice or {}), "latent_norm": add_latent_norm(new, fit, progress)}
    temperatures = fit_logit_scales(model, new, config, fit, held, tokenizer, progress)
    if temperatures is not None:
        choice = {**(choice or {}), "attn_temperature": temperatures}
    if config.output_refit:  # last: it fits o_proj to what the finished layers compute
        windows = serving_windows(tokenizer, config, fit, serving_length(model, config), config.refit_windows)
        choice = {**(choice or {}), "output_refit": refit_outputs(model, new, windows, progress=progress)}
    return new, choice, config


def serving_length(model, config: LowRankConfig) -> int:
    """Tokens per calibration window at the context served: temperature_seq_len, within the source's reach."""
    return min(config.temperature_seq_len, getattr(model.config, "max_position_embeddings", None) or 1 << 30)


def fit_logit_scales(model, new, config: LowRankConfig, fit: torch.Tensor, held: torch.Tensor, tokenizer,
                     progress: bool) -> dict | None:
    """Per-head factors fitted to the source's attention, then one shared factor (config.attn_temperature, or
    chosen on calibration windows at temperature_seq_len tokens), all folded into `new`'s queries -> the
    record's entry. A lossless conversion attends as its source does: its factors stay 1."""
    heads = fit_temperatures(model, new, fit, progress) if config.head_temperatures else None
    if config.attn_temperature is None:
        if heads is not None and heads["max_deviation"] < LOSSLESS:
            return {**heads, "temperature": 1.0}
        windows = serving_windows(tokenizer, config, held if len(held) else fit, serving_length(model, config))
        return {**(heads or {}), **choose_temperature(new, windows, held_out_nll)}
    scale_logits(new, config.attn_temperature)
    if heads is None and config.attn_temperature == 1.0:  # --attn-temperature off: nothing was changed
        return None
    return {**(heads or {}), "temperature": config.attn_temperature}
