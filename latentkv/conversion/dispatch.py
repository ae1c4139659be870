"""`convert(model, config)`: look up the config type's converter, compute new weights, swap modules."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from ..families import SourceLayout, source_layout
from ..record import make_record
from .allocate import allocate_search, allocate_spectrum
from .calibration import calibration_ids, calibration_record, oneshot_stats, split_ids
from .configs import LowRankConfig, config_to_dict
from .converters import converter_for
from .dims import check_config, checked, fit_to_source, fixed_dims
from .latent_norm import add_latent_norm
from .rope import sample_windows
from .search import export_schedule, search_split
from .sequential import convert_sequential
from .surgery import check_finite, convert_oneshot

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
        new, choice, config = convert_calibrated(model, layout, config, calib_ids, progress, calib_cache)
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
                       cache: dict | None = None):
    """ids (N, T) calibration windows -> (converted model, the record's split_search entry or None, the
    config as applied: `rope` is the strategy the split search chose)."""
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
    return new, choice, config
