"""Where a decode step's time goes: torch.profiler over a few steps after a prefill.

    python benchmarks/profile_decode.py MODEL_OR_DIR --context 4096 --batch 4 --steps 8 [--out runs/profile.txt]

Prints the ops by self CPU time (and the share of the step they take) for the model's own decode
path (absorbed for converted models), so a missed speed target can be explained with numbers.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

from latentkv import load_model
from latentkv.reports.bench import PREFILL_CHUNK, decode
from latentkv.runtime.generation import new_cache, prefill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=15, help="ops listed")
    p.add_argument("--out", help="also write the table here")
    a = p.parse_args()
    model, _ = load_model(a.model, progress=False)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, a.context), generator=torch.Generator().manual_seed(0))
    first = new_cache(model, a.context + 2 * a.steps)
    prefill(model, ids, first, chunk=PREFILL_CHUNK)
    cache = copy.deepcopy(first)
    if a.batch > 1:
        cache.batch_repeat_interleave(a.batch)
    decode(model, cache, a.batch, a.context, 2, vocab)  # warm-up: folds, allocator
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(model, cache, a.batch, a.context + 2, a.steps, vocab)
    step_ms = (time.perf_counter() - t) / a.steps * 1e3
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows)
    head = (f"{a.model}: context {a.context}, batch {a.batch}, {a.steps} steps, {step_ms:.1f} ms/step under the "
            f"profiler, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(head, table, sep="\n")
    if a.out:
        with open(a.out, "w") as f:
            f.write(head + "\n" + table + "\n")


if __name__ == "__main__":
    main()
