"""Zero-shot lm-eval-harness scores of the source and its conversions -> BENCHMARKS.md ("lm-eval").

    python benchmarks/harness.py --models smollm2-135m runs/kv50 runs/kv25 --limit 500

Each model (a source name or a converted/healed directory) is scored through lm-eval's HFLM on our
runtime objects, on the local tasks (`latentkv/reports/harness.py` says how each is built) or any
--tasks the machine can reach. The first model is the reference the others are compared with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from latentkv import load_model
from latentkv.record import record_of
from latentkv.reports.harness import LOCAL_TASKS, run_tasks, task_manager
from latentkv.runtime.accounting import cache_report

from common import add_output_args, section, write_outputs


def describe(model, name: str) -> str:
    """`name (share of the source's cache, split)` for a conversion; `name (K KV heads)` for a stock model
    (a source, or a `--target gqa` merge: nothing in its files says which), healed or not."""
    record = record_of(model)
    if record is None:
        heal = Path(name) / "heal.json"
        healed = f", healed {json.loads(heal.read_text())['tokens']:,} tok" if heal.is_file() else ""
        kv = getattr(model.config, "num_key_value_heads", None)
        return f"{name} ({kv} KV head{'s' * (kv != 1)}{healed})" if kv else name
    rep, layer = cache_report(model), (record.get("layers") or [{}])[0]
    healed = f", healed {record['heal']['tokens']:,} tok" if record.get("heal") else ""
    return (f"{name} ({rep['ratio']:.1%}, {layer.get('qk_rope_head_dim', '?')}+{layer.get('kv_lora_rank', '?')}"
            f"{healed})")


def run(args) -> dict:
    path = Path(args.json_out)
    res = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    tasks = args.tasks.split(",")
    manager = task_manager(tasks)
    for name in args.models:
        if name in res:
            continue
        model, tok = load_model(name, progress=False)
        t0 = time.perf_counter()
        out = run_tasks(model, tok, tasks, limit=args.limit, max_length=args.seq_len, manager=manager)
        res[name] = {**out, "label": describe(model, name), "seconds": round(time.perf_counter() - t0, 1)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
        print(f"{name}: {out['scores']}", file=sys.stderr)
    return res


def render(res: dict, args) -> str:
    names = [n for n in args.models if n in res]
    tasks = args.tasks.split(",")
    metrics = [(t, m) for t in tasks for m in res[names[0]]["scores"].get(t, {})]
    head = "| model | " + " | ".join(f"{t.removeprefix('latentkv_')} {m}" for t, m in metrics) + " | seconds |"
    rows = [head, "|---|" + "---:|" * (len(metrics) + 1)]
    ref = res[names[0]]["scores"]
    for n in names:
        cells = []
        for t, m in metrics:
            v = res[n]["scores"].get(t, {}).get(m)
            delta = "" if n == names[0] or v is None else f" ({v - ref[t][m]:+.3f})" if m != "perplexity" \
                else f" (x{v / ref[t][m]:.2f})"
            cells.append("-" if v is None else f"{v:.3f}{delta}")
        rows.append(f"| {res[n]['label']} | " + " | ".join(cells) + f" | {res[n]['seconds']} |")
    docs = ", ".join(f"{t}: {res[names[0]]['docs'].get(t)}" for t in tasks)
    intro = (f"Zero-shot through lm-eval-harness (HFLM on our runtime objects; {docs} documents, windows of "
             f"{args.seq_len} tokens). Tasks as built in `latentkv/reports/harness.py`: `lastword_ptb` = last word "
             "of PTB test sentences after two sentences of context (acc: greedy gives the word; perplexity of "
             "the word); `cloze_fiction` = 4-way next word over the held-out fiction books, distractors from the "
             "same passage (acc, acc_norm). In brackets: difference to the first row (perplexity: ratio).")
    return section(args.section, "Zero-shot tasks through lm-eval-harness", intro, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m"], help="source first, then conversions")
    p.add_argument("--tasks", default=",".join(LOCAL_TASKS))
    p.add_argument("--limit", type=int, default=500, help="documents per task")
    p.add_argument("--seq-len", type=int, default=2048)
    add_output_args(p, "lm-eval", "runs/harness.json", resume="skip models already in --json-out")
    args = p.parse_args()
    res = run(args)
    write_outputs(args, res, render(res, args))


if __name__ == "__main__":
    main()
