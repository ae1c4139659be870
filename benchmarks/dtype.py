"""bf16 against fp32 on this CPU, side by side in one run: perplexity and speed -> BENCHMARKS.md ("dtype").

    python benchmarks/dtype.py --reuse runs/deploy/native-0.5

For the source and a conversion (`--reuse DIR`, else the default 50 % conversion), each loaded in each
--dtypes: WikiText-2 test perplexity (first --windows windows of --seq-len), and `latentkv bench`'s
batch-1 prefill time and decode tokens/s at --context (absorbed decode for the conversion).
"""

from __future__ import annotations

import argparse
import json
import sys

from latentkv import LowRankConfig, convert, load_model, load_text
from latentkv.evaluation.perplexity import perplexity
from latentkv.reports.bench import bench

from common import add_output_args, section, write_outputs


def measure(model, tok, args) -> dict:
    p = perplexity(model, tok, load_text("wikitext2"), seq_len=args.seq_len, max_windows=args.windows, progress=False)
    rows = bench(model, None, contexts=(args.context,), batches=(1,), new_tokens=args.new_tokens, progress=False)["rows"]
    row = next(r for r in rows if r["variant"] in ("source", "latent-absorbed"))
    return {"ppl": p.ppl, "ppl_seconds": p.seconds, "prefill_s": row["prefill_s"],
            "decode_tokens_per_s": row["decode_tokens_per_s"]}


def run(args) -> dict:
    res = {}
    for dtype in args.dtypes:
        for name, where in (("source", args.model), ("converted", args.reuse)):
            if where is None:  # convert once in fp32, then cast like a loaded checkpoint
                src, tok = load_model(args.model, dtype="float32", progress=False)
                model = convert(src, LowRankConfig(kv_budget=args.budget), tokenizer=tok, progress=False).to(dtype)
            else:
                model, tok = load_model(where, dtype=dtype, progress=False)
            res[f"{name} {dtype}"] = measure(model, tok, args)
            print(name, dtype, json.dumps(res[f"{name} {dtype}"]), file=sys.stderr, flush=True)
    return res


def markdown(args, res: dict) -> str:
    intro = (f"WikiText-2 test, first {args.windows} windows of {args.seq_len} tokens; `latentkv bench` at context "
             f"{args.context}, batch 1, {args.new_tokens} new tokens (absorbed decode for the conversion); ratios "
             f"against the same model in {args.dtypes[0]}, measured in this one run. The CPU has AVX2 and no native "
             "bf16 matmul, so bf16 here is a memory format, not a speed-up.")
    lines = ["| model | dtype | ppl | ppl ratio | prefill s | decode tok/s | speed ratio |", "|---|---|---:|---:|---:|---:|---:|"]
    for key, r in res.items():
        name, dtype = key.split(" ")
        base = res[f"{name} {args.dtypes[0]}"]
        lines.append(f"| {name} | {dtype} | {r['ppl']:.3f} | x{r['ppl'] / base['ppl']:.4f} | {r['prefill_s']:.2f} | "
                     f"{r['decode_tokens_per_s']:.1f} | x{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} |")
    return section(args.section, "bf16 against fp32 on this CPU", intro, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--reuse", help="a saved conversion (default: convert at --budget)")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=16)
    add_output_args(p, "dtype", json_out="runs/dtype.json")
    args = p.parse_args()
    res = run(args)
    write_outputs(args, res, markdown(args, res))


if __name__ == "__main__":
    main()
