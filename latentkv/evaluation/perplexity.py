"""Perplexity with one documented protocol.

The text is tokenized once as given (no BOS/EOS added). Without `stride`: consecutive
non-overlapping windows of `seq_len` tokens; in each, every token but the first is predicted.
With `stride` s < seq_len: windows start every s tokens and only tokens not scored by an earlier
window are scored, so each predicted token sees >= seq_len - s tokens of context (the usual
sliding protocol). NLL is averaged over every scored token (token-weighted), ppl = exp(NLL).

With `cache_factory` (a quantized latent cache, `LatentCache(model, cache_dtype=...)`), each window
runs with a fresh cache from it: every token's latent is written to the cache first and every query
reads the stored (quantized) latents, its own token's included, as a decode over that cache would.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..errors import LatentKVError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # tokens scored
    windows: int
    seq_len: int
    stride: int | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, seq_len: int, stride: int | None) -> list[tuple[int, int, int]]:
    """-> [(begin, end, first_scored)] covering tokens 1..n_tokens-1 exactly once."""
    step = stride or seq_len
    out, scored_to = [], 1
    for begin in range(0, n_tokens - 1, step):
        end = min(begin + seq_len, n_tokens)
        if end <= scored_to:
            continue
        out.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, first: int, cache_factory: Callable | None = None) -> float:
    """Summed NLL of tokens ids[first:] of one window (T,), each given the tokens before it."""
    if cache_factory is None:
        out = model(ids[None], use_cache=False)
    else:
        out = model(ids[None], cache=cache_factory(), use_cache=True)
    logits = out.logits[0, first - 1: -1].float()  # (T - first, V)
    return torch.nn.functional.cross_entropy(logits, ids[first:], reduction="sum").item()


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 2048, stride: int | None = None,
               max_windows: int | None = None, progress: bool = True, cache_factory: Callable | None = None) -> Perplexity:
    """Token-weighted perplexity of `model` on `text` (see module docstring for the protocol)."""
    if seq_len < 2:
        raise LatentKVError(f"--seq-len must be at least 2, got {seq_len}")
    if stride is not None and not 0 < stride <= seq_len:
        raise LatentKVError(f"--stride must be in (0, seq_len={seq_len}], got {stride}")
    if max_windows is not None and max_windows < 1:
        raise LatentKVError(f"--max-windows must be at least 1, got {max_windows}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise LatentKVError("text has fewer than 2 tokens; pass a longer text")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and min(seq_len, ids.numel()) > limit:
        raise LatentKVError(f"--seq-len {seq_len} exceeds the model's {limit} positions; use --seq-len {limit} or less")
    spans = windows(ids.numel(), seq_len, stride)[:max_windows]
    device = next(model.parameters()).device
    total, count, start = 0.0, 0, time.perf_counter()
    for begin, end, first in tqdm(spans, desc="perplexity", disable=not progress):
        total += window_nll(model, ids[begin:end].to(device), first - begin, cache_factory)
        count += end - first
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(spans), seq_len, stride, time.perf_counter() - start)
