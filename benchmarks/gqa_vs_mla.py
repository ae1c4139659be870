"""Fewer KV heads (--target gqa) against MLA at the same cache bytes, training-free -> BENCHMARKS.md ("gqa-vs-mla").

    python benchmarks/gqa_vs_mla.py --kv-heads 1 --windows 4

Rows: the source; `to_gqa` with --kv-heads K (a stock checkpoint of the source's class); the default MLA
conversion at the same share of the cache, K / G. Both calibrate on the same default mixture. Perplexity
on the first --windows windows of WikiText-2 and PTB test; passkey at --passkey tokens (0: skip).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from latentkv import LowRankConfig, convert, load_model, load_text, passkey, to_gqa

from common import add_output_args, ppl_row, section, write_outputs

TEXTS = ("wikitext2", "ptb")


def measure(model, tok, args) -> dict:
    row = ppl_row(model, tok, {t: load_text(t) for t in TEXTS}, args.seq_len, args.windows)
    if args.passkey:
        row["passkey"] = passkey(model, tok, contexts=(args.passkey,), trials=args.trials, progress=False)["accuracy"]
    return row


def run(args) -> dict:
    path = Path(args.json_out)
    res = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    source, tok = load_model(args.model, progress=False)
    share = args.kv_heads / source.config.num_key_value_heads
    builds = {"source": lambda: source,
              f"gqa {args.kv_heads} KV heads": lambda: to_gqa(source, args.kv_heads, tokenizer=tok, progress=False),
              f"mla {share:.1%}": lambda: convert(source, LowRankConfig(kv_budget=share), tokenizer=tok, progress=False)}
    for name, build in builds.items():
        if name in res:
            continue
        t0 = time.perf_counter()
        model = build()
        res[name] = {"convert_s": round(time.perf_counter() - t0, 1), **measure(model, tok, args)}
        print(name, json.dumps(res[name]), file=sys.stderr, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
    return res


def markdown(args, res: dict) -> str:
    src = res["source"]
    intro = (f"Training-free. Perplexity on the first {args.windows} windows of {args.seq_len} tokens of WikiText-2 "
             f"and PTB test; passkey at {args.passkey or '-'} tokens ({args.trials} trials per depth); cache bytes "
             "per token at fp32 (the source's dtype here). `gqa`: `convert --target gqa`, a stock checkpoint; `mla`: "
             "the default conversion at the same share of the cache.")
    lines = ["| model | cache bytes/token | share | wikitext2 | ptb | passkey | convert s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        cells = " | ".join(f"{r[t]:.2f} (x{r[t] / src[t]:.2f})" for t in TEXTS)
        key = f"{r['passkey']:.0%}" if "passkey" in r else "-"
        lines.append(f"| {name} | {r['cache_bytes_per_token']:,} | {r['cache_bytes_per_token'] / src['cache_bytes_per_token']:.1%}"
                     f" | {cells} | {key} | {r['convert_s']} |")
    return section(args.section, f"Fewer KV heads against MLA at equal bytes: {args.model}", intro, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--passkey", type=int, default=0)
    p.add_argument("--trials", type=int, default=1)
    add_output_args(p, "gqa-vs-mla", json_out="runs/gqa_vs_mla.json", resume="skip rows already in --json-out")
    args = p.parse_args()
    res = run(args)
    write_outputs(args, res, markdown(args, res))


if __name__ == "__main__":
    main()
