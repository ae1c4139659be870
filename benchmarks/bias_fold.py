"""How much of an attention bias a bias-free DeepSeek-V3 export can carry -> BENCHMARKS.md ("bias-fold").

    python benchmarks/bias_fold.py --models smollm2-135m gemma3-270m
    python benchmarks/bias_fold.py --models Qwen/Qwen2.5-0.5B      # where the checkpoint is reachable

An export-grade conversion drops a source's non-rotated key bias and moves its value bias exactly
(conversion/biases.py). The query bias and the rotated key bias have no exact bias-free form; they fold
into the weights as b (a . x), a the linear read of the layer's input x closest to the constant 1.
Per model and layer, on WikiText-2 *valid* windows through the source (a fitted on half of them, scored
on the other half): the share of a bias that read misses, E(1 - a.x)^2, and for a source with biases the relative error the fold leaves in its query and
key (upper bound: every key dim rotated).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from latentkv import load_model, load_text
from latentkv.conversion.biases import fold_costs

from common import add_output_args, section, write_outputs

COLUMNS = ("constant_residual", "query_error", "key_error")


def run(args) -> dict:
    res = {}
    for name in args.models:
        model, tok = load_model(name, progress=False)
        ids = tok(load_text("wikitext2-valid")[:400_000], return_tensors="pt").input_ids[0]
        n = args.windows * args.seq_len
        res[name] = {"layers": fold_costs(model, ids[:n].view(args.windows, args.seq_len)),
                     "biases": model.model.layers[0].self_attn.q_proj.bias is not None
                     if hasattr(model.model.layers[0].self_attn, "q_proj") else False}
        print(name, json.dumps(summary(res[name]["layers"])), file=sys.stderr, flush=True)
    return res


def summary(layers: list[dict]) -> dict:
    """column -> (median, min, max, layer 0) over layers, for the columns present."""
    out = {}
    for c in COLUMNS:
        vals = [row[c] for row in layers if c in row]
        if vals:
            out[c] = (statistics.median(vals), min(vals), max(vals), vals[0])
    return out


def markdown(args, res: dict) -> str:
    intro = (f"{args.windows} WikiText-2 valid windows of {args.seq_len} tokens through the source, the read a "
             f"fitted on the first half and scored on the second; per layer E(1 - a.x)^2 of the attention inputs x (the share of a bias a linear fold misses), and for sources "
             f"with biases the fold's relative error in the query and (upper bound) the key. Cells: median over "
             f"layers [min, max]; layer 0 apart (it reads embeddings).")
    lines = ["| model | biases | layers | missed share of a bias | layer 0 | query error | key error (bound) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        s = summary(r["layers"])
        cell = lambda c: f"{s[c][0]:.3%} [{s[c][1]:.3%}, {s[c][2]:.3%}]" if c in s else "-"  # noqa: E731
        lines.append(f"| {name} | {'yes' if r['biases'] else 'no'} | {len(r['layers'])} | {cell('constant_residual')} | "
                     f"{s['constant_residual'][3]:.3%} | {cell('query_error')} | {cell('key_error')} |")
    return section(args.section, "Bias folds: what a bias-free export can carry", intro, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--windows", type=int, default=16, help="half fit the read, half score it")
    p.add_argument("--seq-len", type=int, default=512)
    add_output_args(p, "bias-fold", json_out="runs/bias_fold.json")
    args = p.parse_args()
    res = run(args)
    write_outputs(args, res, markdown(args, res))


if __name__ == "__main__":
    main()
