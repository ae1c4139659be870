"""Which layers of a converted model may go local (DuoAttention / RazorAttention composed with MLA).

A retrieval probe scores each layer by how much the passkey answer's negative log-likelihood rises
when that layer alone keeps only its sinks and window (`runtime.local`): a layer that retrieval rests
on scores high and stays full; the lowest-scoring layers go local first. The probe's keys and depths
are its own (seed and depths apart from `evaluation.passkey`'s defaults), so the accuracy measured
afterwards is not the probe's own data.
"""

from __future__ import annotations

import logging
import random

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LatentKVError
from ..evaluation.passkey import build_prompt
from ..runtime.accounting import cache_report
from ..runtime.install import held_bytes, mla_layers, set_local_layers
from ..runtime.local import LocalSpan

log = logging.getLogger(__name__)

PROBE_DEPTHS = (0.1, 0.4, 0.7)  # needles well outside a 4K prompt's window; not the evaluation's grid
PROBE_SEED = 1


@torch.no_grad()
def answer_nll(model, prompts: list[tuple[list[int], list[int]]]) -> float:
    """Mean NLL per answer token over (prompt ids, answer ids) pairs."""
    device, total, count = next(model.parameters()).device, 0.0, 0
    for prompt, answer in prompts:
        ids = torch.tensor([prompt + answer], device=device)
        logits = model(ids, use_cache=False).logits[0, len(prompt) - 1: -1].float()  # (A, V)
        total += float(F.cross_entropy(logits, ids[0, len(prompt):], reduction="sum"))
        count += len(answer)
    return total / count


def retrieval_scores(model, tokenizer, context: int = 4096, span: LocalSpan | None = None, trials: int = 1,
                     progress: bool = True) -> dict:
    """-> {"base_nll", "scores": per layer, the rise of the probe's answer NLL with that layer alone local}.
    The model's local layers are restored afterwards."""
    span = span or LocalSpan()
    rng = random.Random(PROBE_SEED)
    prompts = [build_prompt(tokenizer, context, depth, str(rng.randint(10000, 99999)))
               for depth in PROBE_DEPTHS for _ in range(trials)]
    before = [i for i, a in enumerate(mla_layers(model)) if a.local]
    before_span = next((a.local for a in mla_layers(model) if a.local), span)
    set_local_layers(model, [])
    base = answer_nll(model, prompts)
    scores = []
    try:
        for i in tqdm(range(len(mla_layers(model))), desc="retrieval probe", disable=not progress):
            set_local_layers(model, [i], span)
            scores.append(answer_nll(model, prompts) - base)
    finally:
        set_local_layers(model, before, before_span)
    log.info("retrieval probe at %d tokens: base NLL %.3f; layers by score: %s", context, base,
             sorted(range(len(scores)), key=lambda i: -scores[i]))
    return {"context": context, "span": {"sinks": span.sinks, "window": span.window}, "base_nll": base,
            "scores": scores}


def local_order(scores: list[float]) -> list[int]:
    """Layers in the order they go local: the least retrieval-bearing first."""
    return sorted(range(len(scores)), key=lambda i: scores[i])


def localize(model, tokenizer, count: int | None = None, layers=None, span: LocalSpan | None = None,
             probe_context: int = 2048, contexts=(4096, 32768), progress: bool = True) -> dict:
    """Make `layers` local, or the `count` least retrieval-bearing ones by the probe; -> what was chosen and
    the bytes one sequence's cache holds at `contexts` (and the source's) before and after."""
    span = span or LocalSpan()
    if (count is None) == (layers is None):
        raise LatentKVError("give --count K (chosen by the retrieval probe) or --layers i,j,... (not both)")
    total = len(mla_layers(model))
    probe = None
    if layers is None:
        if not 0 <= count <= total:
            raise LatentKVError(f"--count {count}: the model has {total} layers; choose 0 to {total}")
        probe = retrieval_scores(model, tokenizer, probe_context, span, progress=progress)
        layers = local_order(probe["scores"])[:count]
    full = {c: held_bytes(model, c) for c in contexts}
    set_local_layers(model, layers, span)
    src = cache_report(model)["source"]["bytes_per_token"]
    return {"local_layers": sorted(layers), "sinks": span.sinks, "window": span.window, "probe": probe,
            "bytes": {c: {"full": full[c], "local": held_bytes(model, c), "source": src * c} for c in contexts}}
