"""Local layers on a converted model (DuoAttention / RazorAttention with MLA): cache bytes against passkey
accuracy -> BENCHMARKS.md ("duo") and a plot.

    python benchmarks/duo.py --model runs/kv50 --context 4096 --probe-context 2048 --locals 0 10 20 25 30 --resume

Stages (each saved to --json-out; --resume skips finished ones):
  probe     per layer, the rise of a passkey probe's answer NLL when that layer alone goes local
            (`reports.duo.retrieval_scores`; its own keys and depths)
  local K   the K lowest-scoring layers local (sinks + window), the rest full: passkey accuracy at
            --context (the evaluation's own keys and depth grid), WikiText-2 test perplexity on
            --windows windows of --seq-len, and the cache bytes one sequence holds at --context
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latentkv import load_model, load_text, passkey
from latentkv.evaluation.perplexity import perplexity
from latentkv.io.plots import figure, plot_title
from latentkv.reports.duo import local_order, retrieval_scores
from latentkv.runtime.accounting import cache_report
from latentkv.runtime.install import held_bytes, set_local_layers
from latentkv.runtime.local import LocalSpan

from common import add_output_args, section, write_outputs


def run(args) -> dict:
    path = Path(args.json_out)
    res = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    model, tok = load_model(args.model, progress=False)
    span = LocalSpan(args.sinks, args.window)
    if "probe" not in res:
        res["probe"] = retrieval_scores(model, tok, args.probe_context or args.context, span, trials=args.probe_trials)
        save(path, res)
    order = local_order(res["probe"]["scores"])
    source_bytes = cache_report(model)["source"]["bytes_per_token"] * args.context
    text = load_text("wikitext2")
    for k in args.locals:
        name = f"local {k}"
        if name in res:
            continue
        set_local_layers(model, order[:k], span)
        key = passkey(model, tok, contexts=(args.context,), trials=args.trials, progress=False)
        ppl = perplexity(model, tok, text, seq_len=args.seq_len, max_windows=args.windows, progress=False).ppl
        held = held_bytes(model, args.context)
        res[name] = {"local_layers": sorted(order[:k]), "passkey": key["accuracy"], "wikitext2": ppl,
                     "bytes": held, "share_of_source": held / source_bytes}
        print(name, json.dumps(res[name]), file=sys.stderr, flush=True)
        save(path, res)
    return res


def save(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))


def plot(args, res: dict) -> None:
    rows = [res[f"local {k}"] for k in args.locals if f"local {k}" in res]
    with figure(args.plot, title=plot_title(args.model, "fp32")) as (_, ax):
        ax.plot([100 * r["share_of_source"] for r in rows], [100 * r["passkey"] for r in rows], "o-")
        for k, r in zip(args.locals, rows):
            ax.annotate(f"{k} local", (100 * r["share_of_source"], 100 * r["passkey"]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        ax.set(xlabel=f"cache held at {args.context} tokens, % of the source's", ylabel=f"passkey at {args.context}, %",
               title=f"Local layers (sinks {args.sinks} + window {args.window}) on an MLA conversion")
        ax.grid(alpha=0.3)


def markdown(args, res: dict) -> str:
    probe = res["probe"]
    top = sorted(range(len(probe["scores"])), key=lambda i: -probe["scores"][i])[:6]
    named = ", ".join(f"{i} (+{probe['scores'][i]:.2f})" for i in top)
    intro = (f"{args.model}; local layers keep {args.sinks} sink tokens and a window of {args.window}. Layers go "
             f"local in the order of a retrieval probe (passkey answer NLL rise with that layer alone local, "
             f"{probe['context']}-token prompts, its own keys and depths; base NLL {probe['base_nll']:.3f}; the most "
             f"retrieval-bearing layers: {named}). Passkey at "
             f"{args.context} tokens, {args.trials} trials per depth (0, .25, .5, .75, 1); WikiText-2 test on "
             f"{args.windows} windows of {args.seq_len}; bytes one sequence's cache holds at {args.context} tokens. "
             f"Plot: `{args.plot}`.")
    rows = ["| local layers | cache bytes at context | share of source | passkey | wikitext2 |",
            "|---:|---:|---:|---:|---:|"]
    for k in args.locals:
        r = res.get(f"local {k}")
        if r:
            rows.append(f"| {k} | {r['bytes']:,} | {r['share_of_source']:.1%} | {r['passkey']:.0%} | {r['wikitext2']:.2f} |")
    return section(args.section, f"Local layers with MLA (DuoAttention-style): {args.model}", intro, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/kv50")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--locals", type=int, nargs="+", default=[0, 10, 20, 25, 30])
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--probe-trials", type=int, default=1)
    p.add_argument("--probe-context", type=int, default=0, help="the probe's prompt length (0: --context)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--plot", default="docs/duo.png")
    add_output_args(p, "duo", json_out="runs/duo.json", resume="skip stages already in --json-out")
    args = p.parse_args()
    res = run(args)
    plot(args, res)
    write_outputs(args, res, markdown(args, res))


if __name__ == "__main__":
    main()
