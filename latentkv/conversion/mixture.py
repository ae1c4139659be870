"""The default calibration text (`--calib mix`): windows from several domains, and windows in which
a span of text comes back.

A conversion fitted to encyclopedic prose alone is never asked to copy, and loses in-context
copying first (BENCHMARKS.md, "domains"). The mixture takes an equal share of windows from each
domain's *calibration* part (`io.domains`: WikiText-2 valid, Gutenberg books held apart from the
evaluation ones, half of the standard library, half of the installed READMEs; a domain that is not
on this machine is skipped with a warning), and one more share of `repeats` windows: a span A of
that natural text, other text B, then A again, so the statistics see induction heads at work on
real tokens. One window of each component is placed where `split_ids` holds windows out, so the
split search and rank allocation score every domain.
"""

from __future__ import annotations

import logging

import torch

from ..errors import LatentKVError
from ..io.domains import CALIB_DOMAINS, domain_text

log = logging.getLogger(__name__)

MIX = "mix"
REPEATS = "repeats"


def mixture_windows(tokenizer, windows: int, seq_len: int, held: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """-> ((windows, seq_len) token ids, {component: window count}); `held` (k,) are the positions
    split_ids keeps out, each given a different component first."""
    streams = {}
    for name in CALIB_DOMAINS:
        try:
            streams[name] = torch.tensor(tokenizer(domain_text(name, "calib"), add_special_tokens=False)["input_ids"])
        except LatentKVError as e:
            log.warning("calibration mixture: no %s text here (%s); mixing the others", name, e)
    if not streams:
        raise LatentKVError("no calibration text of any domain is available here; pass --calib FILE")
    names = [*streams, REPEATS]
    counts = {name: windows // len(names) + (i < windows % len(names)) for i, name in enumerate(names)}
    parts = {name: list(_spread(streams[name], counts[name], seq_len)) for name in streams}
    parts[REPEATS] = list(_repeats(torch.cat(list(streams.values())), counts[REPEATS], seq_len))
    return _arrange(parts, names, windows, held), counts


def _spread(ids: torch.Tensor, count: int, seq_len: int):
    """`count` windows evenly spaced over a token stream."""
    if count == 0:
        return
    if ids.numel() < seq_len:
        raise LatentKVError(f"a calibration domain has {ids.numel()} tokens, fewer than --calib-seq-len {seq_len}")
    for s in torch.linspace(0, ids.numel() - seq_len, count).long():
        yield ids[s: s + seq_len]


def _repeats(ids: torch.Tensor, count: int, seq_len: int):
    """Windows A + B + A with |A| = seq_len / 4, A and B from evenly spaced, different places."""
    q = seq_len // 4
    for k, s in enumerate(torch.linspace(0, ids.numel() - seq_len, max(count, 1)).long()[:count]):
        a = ids[s: s + q]
        b_start = (s + ids.numel() // 2 + k) % (ids.numel() - seq_len)  # half the stream away from A
        yield torch.cat((a, ids[b_start: b_start + seq_len - 2 * q], a))


def _arrange(parts: dict, names: list[str], windows: int, held: torch.Tensor) -> torch.Tensor:
    slots: list[torch.Tensor | None] = [None] * windows
    for j, pos in enumerate(held.tolist()):
        for name in names[j % len(names):] + names[: j % len(names)]:  # next component with windows left
            if parts[name]:
                slots[pos] = parts[name].pop(0)
                break
    rest = [w for i in range(max(map(len, parts.values()), default=0)) for n in names if i < len(parts[n])
            for w in [parts[n][i]]]
    it = iter(rest)
    return torch.stack([s if s is not None else next(it) for s in slots])

