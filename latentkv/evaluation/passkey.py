"""Synthetic passkey retrieval (the needle test), generated locally: no download.

A random 5-digit key is hidden at a relative depth of a filler haystack sized to the target
context in tokens; the model must complete "The pass key is" with it. Greedy decoding emits the
key iff the argmax at every key token (teacher-forced) is that token, so one forward per trial
decides it. KV compression tends to hurt this long-range lookup first.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..errors import LatentKVError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyResult:
    context: int  # target prompt length in tokens
    depth: float  # needle position, 0 = start, 1 = end of the haystack
    trials: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy}


def build_prompt(tokenizer, context: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """-> (prompt ids of about `context` tokens, answer ids " {key}")."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler, needle, question = enc(FILLER), enc(NEEDLE.format(key=key)), enc(QUESTION)
    room = context - len(needle) - len(question)
    if room < len(filler):
        raise LatentKVError(f"--context {context} is too short for a passkey prompt; use at least "
                            f"{len(needle) + len(question) + len(filler)} tokens")
    hay = (filler * (room // len(filler) + 1))[:room]
    cut = round(depth * room)
    return hay[:cut] + needle + hay[cut:] + question, enc(" " + key)


@torch.no_grad()
def passkey(model, tokenizer, contexts=(1024, 2048, 4096), depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 3,
            seed: int = 0, progress: bool = True) -> dict:
    """Accuracy per (context, depth) and overall. Keys come from a seeded RNG, so runs compare."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(contexts) > limit:
        raise LatentKVError(f"--context {max(contexts)} exceeds the model's {limit} positions")
    if any(not 0 <= d <= 1 for d in depths):
        raise LatentKVError("--depths must lie in [0, 1]")
    rng = random.Random(seed)
    device = next(model.parameters()).device
    rows, start = [], time.perf_counter()
    grid = [(c, d) for c in contexts for d in depths]
    for context, depth in tqdm(grid, desc="passkey", disable=not progress):
        correct = 0
        for _ in range(trials):
            prompt, answer = build_prompt(tokenizer, context, depth, str(rng.randint(10000, 99999)))
            ids = torch.tensor([prompt + answer], device=device)
            pred = model(ids, use_cache=False).logits[0, len(prompt) - 1: -1].argmax(-1)
            correct += int(pred.tolist() == answer)
        rows.append(PasskeyResult(context, depth, trials, correct))
    total = sum(r.correct for r in rows) / sum(r.trials for r in rows)
    return {"accuracy": total, "rows": [r.to_dict() for r in rows], "seconds": round(time.perf_counter() - start, 1)}
