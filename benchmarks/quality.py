"""Perplexity and cache size of a source model and its conversions, written to BENCHMARKS.md.

    python benchmarks/quality.py --variants source,exact,svd:0.5 --text wikitext2 --seq-len 2048

Each variant is `source`, `exact`, or `svd:BUDGET`. Results go to a JSON file and to a
section of BENCHMARKS.md (replaced on re-run) that names the command that made them.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from latentkv import ExactConfig, SVDConfig, cache_report, convert, load_model, load_text
from latentkv.evaluate import perplexity


def make_variant(source, spec: str):
    """-> (model, convert seconds or None)."""
    if spec == "source":
        return source, None
    config = ExactConfig() if spec == "exact" else SVDConfig(kv_budget=float(spec.split(":")[1]))
    t0 = time.perf_counter()
    model = convert(source, config)
    return model, time.perf_counter() - t0


def run(args) -> list[dict]:
    source, tok = load_model(args.model)
    text = load_text(args.text)
    rows = []
    for spec in args.variants.split(","):
        model, conv_s = make_variant(source, spec)
        rep = cache_report(model)
        ppl = perplexity(model, tok, text, seq_len=args.seq_len, max_windows=args.max_windows)
        rows.append({"variant": spec, "ppl": ppl.ppl, "nll": ppl.nll, "tokens": ppl.tokens, "windows": ppl.windows,
                     "eval_seconds": round(ppl.seconds, 1), "convert_seconds": conv_s and round(conv_s, 2),
                     "cache_values_per_token_per_layer": rep["model"]["values_per_token_per_layer"][0],
                     "cache_bytes_per_token_fp32": rep["model"]["bytes_per_token"],
                     "cache_bytes_per_token_bf16": rep["model"]["bytes_per_token"] // 2})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del model
    return rows


def markdown(args, rows: list[dict]) -> str:
    cmd = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"<!-- quality:{args.section} -->", f"### Perplexity and cache size: {args.model}, {args.text}",
             "", f"Command: `{cmd}`  ", f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Protocol: `latentkv.evaluate` "
             f"(seq_len {args.seq_len}, non-overlapping, token-weighted).", "",
             "| variant | cache values/token/layer | cache bytes/token (fp32, all layers) | ppl | tokens | "
             "windows | convert s | eval s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['cache_values_per_token_per_layer']} | "
                     f"{r['cache_bytes_per_token_fp32']:,} | {r['ppl']:.4f} | {r['tokens']:,} | {r['windows']} | "
                     f"{r['convert_seconds'] if r['convert_seconds'] is not None else '-'} | {r['eval_seconds']} |")
    lines.append(f"<!-- /quality:{args.section} -->")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, body: str) -> None:
    """Replace this section of BENCHMARKS.md (or append it), writing the file atomically."""
    old = path.read_text() if path.exists() else "# Benchmarks\n\nEvery table names the command that made it.\n"
    start, end = f"<!-- quality:{section} -->", f"<!-- /quality:{section} -->\n"
    if start in old and end in old:
        new = old[: old.index(start)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + body
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", default="source,exact,svd:0.5")
    p.add_argument("--text", default="wikitext2")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--section", default="wikitext2-full", help="BENCHMARKS.md section name to replace")
    p.add_argument("--json-out", default="runs/quality.json")
    p.add_argument("--md", default="BENCHMARKS.md")
    args = p.parse_args()
    rows = run(args)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(rows, indent=2))
    write_section(Path(args.md), args.section, markdown(args, rows))


if __name__ == "__main__":
    main()
