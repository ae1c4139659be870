"""Calibration windows and what is measured on them: the source's one-shot statistics and held-out NLL.

The windows come from `config.calib`: the default domain mixture (`mixture.py`) or a text the
user names (never a test split). `HELD_OUT` of them, spread over the windows (one per mixture
component), are kept aside to score choices (the rope/latent split, rank allocation); the rest fit.
"""

from __future__ import annotations

import logging

import torch

from ..errors import LatentKVError
from ..evaluation.perplexity import window_nll
from ..io.text import check_not_test_split, fingerprint, load_text
from .configs import LowRankConfig
from .mixture import MIX, mixture_windows
from .statistics import InputStats, calibration_batches, collect_stats

log = logging.getLogger(__name__)

HELD_OUT = 5  # calibration windows kept aside to score candidate splits: one per mixture component


def held_positions(windows: int) -> torch.Tensor:
    """(HELD_OUT,) indices of the held-out windows among `windows`, spread over them."""
    return torch.linspace(0, windows - 1, HELD_OUT).round().long()


def calibration_ids(tokenizer, config: LowRankConfig) -> tuple[torch.Tensor, dict]:
    """-> ((calib_samples + HELD_OUT, calib_seq_len) token windows from `config.calib`, what they are:
    {"text", "components" (mixture only)})."""
    if tokenizer is None:
        raise LatentKVError(f"method {config.method} calibrates on text: pass tokenizer= (or calib_ids=) to convert()")
    check_not_test_split(config.calib)
    windows = config.calib_samples + HELD_OUT
    if config.calib == MIX:
        ids, counts = mixture_windows(tokenizer, windows, config.calib_seq_len, held_positions(windows))
        return ids, {"text": MIX, "components": counts}
    return calibration_batches(tokenizer, load_text(config.calib), windows, config.calib_seq_len), {"text": config.calib}


def serving_windows(tokenizer, config: LowRankConfig, fallback: torch.Tensor, seq_len: int,
                    count: int = HELD_OUT) -> torch.Tensor:
    """(count, seq_len) windows of the calibration text at the length served (the mixture: its components
    in turn), to choose the attention temperature on and to refit outputs on; attention flattens with the
    number of keys, so short windows would fit the wrong layer. `fallback` (k, T) when the text is too
    short or only ids were given."""
    if tokenizer is None:
        return fallback
    try:
        if config.calib == MIX:
            return mixture_windows(tokenizer, count, seq_len, torch.arange(min(count, HELD_OUT)))[0]
        return calibration_batches(tokenizer, load_text(config.calib), count, seq_len)
    except LatentKVError as e:
        log.warning("calibration at %d tokens: %s; using the %d-token windows instead", seq_len, e, fallback.shape[1])
        return fallback


def calibration_record(ids: torch.Tensor, info: dict | None) -> dict:
    """The record's `calibration` entry: what the windows were read from and their fingerprint, so a
    conversion can be told apart from one calibrated on other text (mixtures read local files)."""
    return {**(info or {"text": "calib_ids given"}), "windows": list(ids.shape), "fingerprint": fingerprint(ids)}


def split_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (fit windows, held-out windows), the held-out ones spread over the text."""
    if ids.shape[0] <= HELD_OUT:
        return ids, ids[:0]
    held = held_positions(ids.shape[0])
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[held] = False
    return ids[keep], ids[held]


def oneshot_stats(model, ids: torch.Tensor, cache: dict | None = None, progress: bool = False,
                  attention: bool = True, keep: int = 0) -> list[InputStats]:
    """The source's per-layer statistics on the fit part of `ids`, from `cache` when already collected
    (stats with attention-averaged moments, or kept windows, serve requests without them too).
    keep: windows of each layer's input kept as `sample` (rope.sample_windows)."""
    cache = {} if cache is None else cache
    key = (tuple(ids.shape), int(ids.sum()))
    if key not in cache or (attention and cache[key][0].attn_sigma is None) or (keep and cache[key][0].sample is None):
        cache[key] = collect_stats(model, split_ids(ids)[0], progress, attention, keep)
    return cache[key]


def held_out_nll(model, held: torch.Tensor) -> float:
    """Mean next-token NLL of `model` over the held-out windows (N, T)."""
    total = sum(window_nll(model, row, 1) for row in held)
    return total / max(1, held.shape[0] * (held.shape[1] - 1))


def copy_nll(model, held: torch.Tensor) -> float:
    """Mean NLL of copying: each held-out window (N, T) with its first quarter repeated in place of its
    last, scored on that repeat only (tokens 2..T/4 of it), where only the context predicts the text."""
    t = held.shape[1]
    q = t // 4
    repeated = torch.cat((held[:, : t - q], held[:, :q]), 1)  # (N, T)
    total = sum(window_nll(model, row, t - q + 1) for row in repeated)
    return total / max(1, held.shape[0] * (q - 1))


def held_out_score(model, held: torch.Tensor) -> dict:
    """What the split search and rank allocation minimise: the held-out NLL (one window per mixture
    component, so every domain counts alike) plus, with equal weight, the copy NLL."""
    nll, copy = held_out_nll(model, held), copy_nll(model, held)
    return {"heldout_nll": nll, "copy_nll": copy, "score": nll + copy}
