"""Calibration windows and what is measured on them: the source's one-shot statistics and held-out NLL.

The windows come from `config.calib` (never a test split). `HELD_OUT` of them, spread over the
text, are kept aside to score choices (the rope/latent split, rank allocation); the rest fit.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..errors import LatentKVError
from ..evaluation.perplexity import window_nll
from ..io.text import DEFAULT_CALIB, OFFLINE_CALIB, check_not_test_split, load_text
from .configs import LowRankConfig
from .statistics import InputStats, calibration_batches, collect_stats

log = logging.getLogger(__name__)

HELD_OUT = 4  # calibration windows kept aside to score candidate splits


def calibration_ids(tokenizer, config: LowRankConfig) -> tuple[torch.Tensor, LowRankConfig]:
    """-> ((calib_samples + HELD_OUT, calib_seq_len) token windows from `config.calib`, the config they
    were read for). The default text, when neither ../shared nor the hub has it, gives way to the
    sample shipped in the package: the returned config (and so the record) names what was read."""
    if tokenizer is None:
        raise LatentKVError(f"method {config.method} calibrates on text: pass tokenizer= (or calib_ids=) to convert()")
    check_not_test_split(config.calib)
    try:
        text = load_text(config.calib)
    except LatentKVError as e:
        if config.calib != DEFAULT_CALIB:
            raise
        log.warning("calibrating on the packaged %s: %s", OFFLINE_CALIB, e)
        config, text = dataclasses.replace(config, calib=OFFLINE_CALIB), load_text(OFFLINE_CALIB)
    return calibration_batches(tokenizer, text, config.calib_samples + HELD_OUT, config.calib_seq_len), config


def split_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (fit windows, held-out windows), the held-out ones spread over the text."""
    if ids.shape[0] <= HELD_OUT:
        return ids, ids[:0]
    held = torch.linspace(0, ids.shape[0] - 1, HELD_OUT).round().long()
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[held] = False
    return ids[keep], ids[held]


def oneshot_stats(model, ids: torch.Tensor, cache: dict | None = None, progress: bool = False,
                  attention: bool = True) -> list[InputStats]:
    """The source's per-layer statistics on the fit part of `ids`, from `cache` when already collected
    (stats with attention-averaged moments serve requests without them too)."""
    cache = {} if cache is None else cache
    key = (tuple(ids.shape), int(ids.sum()))
    if key not in cache or (attention and cache[key][0].attn_sigma is None):
        cache[key] = collect_stats(model, split_ids(ids)[0], progress, attention)
    return cache[key]


def held_out_nll(model, held: torch.Tensor) -> float:
    """Mean next-token NLL of `model` over the held-out windows (N, T)."""
    total = sum(window_nll(model, row, 1) for row in held)
    return total / max(1, held.shape[0] * (held.shape[1] - 1))
