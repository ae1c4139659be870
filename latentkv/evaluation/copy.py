"""In-context copy probe: can the model repeat a random token sequence it has just seen?

Each probe is a random sequence of `length` token ids (uniform in [low, high), seeded), then
`distance` other random ids, then the same sequence again. Nothing but the context predicts the
second copy, so its scores measure the induction/retrieval circuits alone: greedy next-token
accuracy and mean NLL over the second copy's tokens 2..length (the first one cannot be known to
start a copy). Perplexity on prose barely sees these circuits; copying identifiers, code, quotes
and retrieved facts is all they do. One forward per (length, distance) decides it.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LatentKVError

LOW, HIGH = 1000, 30000  # token ids drawn from here: ordinary vocabulary, no special tokens


def probe_ids(length: int, distance: int, sequences: int, vocab: int, seed: int) -> torch.Tensor:
    """(sequences, 2 * length + distance): copy, gap, copy again; ids in [LOW, min(HIGH, vocab))."""
    high = min(HIGH, vocab)
    low = min(LOW, high // 2)
    g = torch.Generator().manual_seed(seed * 1_000_003 + length * 1009 + distance)
    seq = torch.randint(low, high, (sequences, length), generator=g)
    gap = torch.randint(low, high, (sequences, distance), generator=g)
    return torch.cat((seq, gap, seq), 1)


@torch.no_grad()
def score_second_copy(model, ids: torch.Tensor, length: int) -> tuple[int, int, float]:
    """ids (B, 2L + D) -> (correct, scored, summed NLL) over the second copy's tokens 2..L."""
    first = ids.shape[1] - length + 1  # index of the second copy's second token
    # only the last L positions' logits: the whole (B, T, V) tensor would be GBs at T = 3072
    logits = model(ids, use_cache=False, logits_to_keep=length).logits[:, :-1].float()  # (B, L - 1, V)
    target = ids[:, first:]
    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
    return int((logits.argmax(-1) == target).sum()), target.numel(), nll


def copy_probe(model, lengths=(64, 256, 1024), distances=(0, 1024), sequences: int = 4, seed: int = 0,
               progress: bool = True) -> dict:
    """Accuracy and NLL on the second copy per (length, distance) and over all of them (token-weighted).
    -> {"accuracy", "nll", "rows": [{length, distance, sequences, accuracy, nll}], "seconds"}."""
    if min(lengths) < 2 or min(distances) < 0 or sequences < 1:
        raise LatentKVError("copy probe: lengths must be >= 2 tokens, distances >= 0 and sequences >= 1")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and 2 * max(lengths) + max(distances) > limit:
        raise LatentKVError(f"copy probe: 2 x {max(lengths)} + {max(distances)} tokens exceed the model's {limit} "
                            "positions; choose shorter --copy-lengths or --copy-distances")
    device = next(model.parameters()).device
    rows, totals, start = [], [0, 0, 0.0], time.perf_counter()
    grid = [(n, d) for n in lengths for d in distances]
    for length, distance in tqdm(grid, desc="copy probe", disable=not progress):
        ids = probe_ids(length, distance, sequences, model.config.vocab_size, seed).to(device)
        correct, scored, nll = score_second_copy(model, ids, length)
        rows.append({"length": length, "distance": distance, "sequences": sequences,
                     "accuracy": correct / scored, "nll": nll / scored})
        totals = [totals[0] + correct, totals[1] + scored, totals[2] + nll]
    return {"accuracy": totals[0] / totals[1], "nll": totals[2] / totals[1], "rows": rows,
            "seconds": round(time.perf_counter() - start, 1)}
