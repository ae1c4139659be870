"""The dev suite: perplexity on every domain of `io.domains` (their evaluation parts only) and the
in-context copy probe, for one model. Ratios against a source are the caller's (benchmarks/domains.py)."""

from __future__ import annotations

import time

from ..io.domains import DEV_DOMAINS, domain_text
from .copy import copy_probe
from .perplexity import perplexity

COPY_LENGTHS, COPY_DISTANCES = (64, 256, 1024), (0, 512)
SUITE_WINDOWS = 8  # perplexity windows per domain


def dev_suite(model, tokenizer, domains=DEV_DOMAINS, seq_len: int = 2048, max_windows: int | None = SUITE_WINDOWS,
              copy: bool = True, progress: bool = True) -> dict:
    """-> {"domains": {name: {ppl, nll, tokens, windows}}, "copy": copy_probe result or absent, seq_len,
    max_windows, seconds}. Each domain's text is its evaluation part: never calibration or healing text."""
    start = time.perf_counter()
    out = {"domains": {}, "seq_len": seq_len, "max_windows": max_windows}
    for name in domains:
        p = perplexity(model, tokenizer, domain_text(name, "eval"), seq_len=seq_len, max_windows=max_windows,
                       progress=progress)
        out["domains"][name] = {"ppl": p.ppl, "nll": p.nll, "tokens": p.tokens, "windows": p.windows}
    if copy:
        out["copy"] = copy_probe(model, *copy_grid(model), progress=progress)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def copy_grid(model) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The probe's lengths and distances that fit the model's positions (all of them for 2K+ contexts)."""
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    lengths = tuple(n for n in COPY_LENGTHS if 2 * n <= limit)
    return lengths, tuple(d for d in COPY_DISTANCES if 2 * max(lengths) + d <= limit)
