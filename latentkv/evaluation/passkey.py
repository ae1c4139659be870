"""Synthetic passkey retrieval (the needle test), generated locally: no download.

A random 5-digit key is hidden at a relative depth of a filler haystack sized to the target
context in tokens; the model must complete "The pass key is" with it. Greedy decoding emits the
key iff the argmax at every key token (teacher-forced) is that token, so one forward per trial
decides it. KV compression tends to hurt this long-range lookup first.

That strict score also fails an answer that reaches the key by another path: the tokenizer may split
" 60494" into " " + digits, and the bare space is a weak guess even for the source where the needle
opens or closes the haystack (SmolLM2-135M at 4,096 tokens: p = 0.28-0.42 at depths 0 and 1, " the" close
behind), so the strict score flips with numerics there. Passkey scripts in the literature score the first
number in the generated answer instead; with `continuation` given, every trial gets that score too
(`found`), so both can be compared with the source's.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..errors import LatentKVError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
ANSWER_ROOM = 8  # tokens generated beyond the key's own, so "the 60494" or "60494." still shows its number

Continuation = Callable[[list[int], int], list[int]]  # (prompt ids, n) -> the model's next n greedy ids


@dataclass(frozen=True)
class PasskeyResult:
    context: int  # target prompt length in tokens
    depth: float  # needle position, 0 = start, 1 = end of the haystack
    trials: int
    correct: int  # strict: the greedy answer starts with the key's tokens
    found: int | None = None  # the first number in the greedy answer is the key (None: not scored)

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials

    def to_dict(self) -> dict:
        out = {**asdict(self), "accuracy": self.accuracy}
        if self.found is None:
            del out["found"]
        return out


def first_number(text: str) -> str | None:
    """The first run of digits in `text`, as the literature's passkey scripts read an answer."""
    m = re.search(r"\d+", text)
    return m.group() if m else None


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
            seed: int = 0, progress: bool = True, continuation: Continuation | None = None) -> dict:
    """Accuracy per (context, depth) and overall. Keys come from a seeded RNG, so runs compare.
    continuation: greedy decoding through the model's cache (`runtime.generation.greedy_continuation`);
    given, each row also counts `found` and the result holds `found_accuracy` (module docstring)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(contexts) > limit:
        raise LatentKVError(f"--context {max(contexts)} exceeds the model's {limit} positions")
    if any(not 0 <= d <= 1 for d in depths):
        raise LatentKVError("--depths must lie in [0, 1]")
    rng = random.Random(seed)
    rows, start = [], time.perf_counter()
    grid = [(c, d) for c in contexts for d in depths]
    for context, depth in tqdm(grid, desc="passkey", disable=not progress):
        scores = [_trial(model, tokenizer, context, depth, str(rng.randint(10000, 99999)), continuation, limit)
                  for _ in range(trials)]
        rows.append(PasskeyResult(context, depth, trials, sum(s[0] for s in scores),
                                  None if continuation is None else sum(s[1] for s in scores)))
    out = {"accuracy": sum(r.correct for r in rows) / sum(r.trials for r in rows)}
    if continuation is not None:
        out["found_accuracy"] = sum(r.found for r in rows) / sum(r.trials for r in rows)
    return {**out, "rows": [r.to_dict() for r in rows], "seconds": round(time.perf_counter() - start, 1)}


def _trial(model, tokenizer, context: int, depth: float, key: str, continuation: Continuation | None,
           limit: int | None) -> tuple[bool, bool]:
    """-> (strict, found; found is False when not scored). One teacher-forced forward decides the strict
    score; it also gives the token after the key, so only a strict miss needs decoding to find the number."""
    prompt, answer = build_prompt(tokenizer, context, depth, key)
    ids = torch.tensor([prompt + answer], device=next(model.parameters()).device)
    pred = model(ids, use_cache=False).logits[0, len(prompt) - 1:].argmax(-1).tolist()  # (len(answer) + 1,)
    strict = pred[:-1] == answer
    if continuation is None:
        return strict, False
    if strict:  # greedy decoding emits the answer, then this token
        said = answer + pred[-1:]
    else:
        room = len(answer) + ANSWER_ROOM
        said = continuation(prompt, room if not limit else max(1, min(room, limit - len(prompt))))
    return strict, first_number(tokenizer.decode(said)) == key
