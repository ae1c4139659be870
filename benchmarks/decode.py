"""Decode speed, cache memory and bandwidth floor: SmolLM2 vs its MLA conversions -> BENCHMARKS.md.

    python benchmarks/decode.py --budgets 0.5,0.125 --context 512,1024,4096,8160 --batch 1,4

Each budget is converted (calibrated `lowrank` by default), then `latentkv.bench.bench` measures
the source (first budget only) and both latent decode paths side by side in one process. Rows go
to a JSON file (kept per budget, so `--resume` skips budgets already measured) and to a section
of BENCHMARKS.md with the command that made them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from latentkv import convert, load_model
from latentkv.conversion.configs import make_config
from latentkv.io.checkpoint import read_meta
from latentkv.io.machine import available_memory
from latentkv.record import record_summary
from latentkv.reports.bench import bench, floors, plot

from common import add_output_args, section, write_section


def run(args) -> dict:
    source, tok = load_model(args.model)
    path = Path(args.json_out)
    saved = json.loads(path.read_text()) if args.resume and path.is_file() else {"rows": [], "budgets": []}
    ctx, batch = [int(c) for c in args.context.split(",")], [int(b) for b in args.batch.split(",")]
    for i, budget in enumerate(float(b) for b in args.budgets.split(",")):
        if budget in saved["budgets"]:
            continue
        conv = reused(args, budget) or convert(source, make_config(kv_budget=budget, method=args.method), tokenizer=tok)
        against = source if not any(r["variant"].startswith("source") for r in saved["rows"]) else None
        roofs = (saved["bandwidth_bytes_per_s"], saved["flops_per_s"]) if "flops_per_s" in saved else None
        result = bench(conv, against, ctx, batch, args.new_tokens, compile=args.compile, roofs=roofs)  # one per run
        dims = conv.model.layers[0].self_attn.dims
        for r in result["rows"]:
            own = r["variant"].startswith("source")
            r.update(budget=1.0 if own else budget, split=None if own else f"{dims.qk_rope_head_dim}+{dims.kv_lora_rank}")
        saved["rows"] += result["rows"]
        saved["budgets"].append(budget)
        saved["bandwidth_bytes_per_s"] = result["bandwidth_bytes_per_s"]
        saved["flops_per_s"] = result["flops_per_s"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(saved, indent=2))
        path.with_suffix(".tmp").replace(path)
        del conv
    return saved


def reused(args, budget: float):
    """A saved conversion from --reuse whose cache is `budget` of the source's, or None (each folder's record
    is read, and only the matching one loaded)."""
    for folder in args.reuse or ():
        if abs(record_summary(read_meta(folder)["record"])["ratio"] - budget) < 1e-3:
            return load_model(folder, progress=False)[0]
    return None


def markdown(args, result: dict) -> str:
    rows = result["rows"]
    src = {}  # the fastest source baseline (DynamicCache or StaticCache, eager or compiled) per context and batch
    for r in rows:
        if r["variant"].startswith("source") and "skipped" not in r:
            best = src.get((r["context"], r["batch"]))
            if best is None or r["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
                src[(r["context"], r["batch"])] = r
    intro = (f"Streaming-read bandwidth {result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, fp32 matmul {result.get('flops_per_s', 0) / 1e9:.0f} "
             f"GFLOP/s. fp32. Prefill is timed at batch 1 (chunks of 1024); decode = median of {args.new_tokens} steps; "
             "speed-up = decode tokens/s over the fastest source baseline (transformers' DynamicCache or StaticCache"
             + (", each eager and through torch.compile" if args.compile else "") + ") at the same context and batch; floor = (weights + cache "
             "bytes a step reads) / bandwidth; compute floor = the step's FLOPs / matmul rate; roofline = the larger "
             "floor / step time.")
    lines = ["| budget (rope+latent) | variant | context | batch | prefill s | decode tok/s | speed-up | cache MiB "
             "| peak RSS GiB | floor ms | compute floor ms | step ms | of floor | of roofline |",
             "|---|---|" + "---:|" * 12]
    for r in rows:
        head = f"| {r['budget']:g} ({r.get('split') or 'source'}) | {r['variant']} | {r['context']} | {r['batch']} |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} |" + " |" * 9)
            continue
        base, step = src.get((r["context"], r["batch"])), r["decode_step_s"]
        # at the run's one bandwidth and matmul rate (rows of an older json each carry their own call's)
        f = floors(r["step_bytes"], r["step_flops"], step, (result["bandwidth_bytes_per_s"], result["flops_per_s"]))
        speed = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x" if base else "-"
        lines.append(f"{head} {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.1f} | {speed} | "
                     f"{r['cache_bytes'] / 2 ** 20:.1f} | {r['peak_rss_bytes'] / 2 ** 30:.2f} | {f['floor_s'] * 1e3:.1f} "
                     f"| {f['compute_floor_s'] * 1e3:.1f} | {step * 1e3:.1f} | {f['floor_fraction']:.0%} | "
                     f"{f['roofline_fraction']:.0%} |")
    lines += ["", capacity(rows)]
    return section(args.section, f"Decode speed and cache memory: {args.model}", intro, lines)


def capacity(rows: list[dict]) -> str:
    """How many cached tokens (batch x context) fit in this machine's free memory, per variant."""
    free = available_memory() or 0
    per = {}
    for r in rows:
        if "skipped" not in r:
            per.setdefault(f"{r['budget']:g} {'source' if r['variant'].startswith('source') else 'latent'}",
                           r["cache_bytes_per_token"])
    src = per.get("1 source")
    parts = [f"{k}: {free // v:,} tokens ({v:,} B/token)" + (f", {src / v:.1f}x the source" if src else "")
             for k, v in per.items()]
    return f"Cache capacity in the {free / 2 ** 30:.1f} GiB now free: " + "; ".join(parts) + "."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", default="0.5,0.125")
    p.add_argument("--method", default=None, help="conversion method (default: calibrated lowrank)")
    p.add_argument("--context", default="512,1024,4096,8160", help="SmolLM2 has 8192 positions: 8160 + 32 new fit")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reuse", nargs="*", help="converted directories to bench instead of converting (matched by budget)")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd twins of the source and absorbed rows")
    p.add_argument("--plot", default="docs/decode-v2.png")
    add_output_args(p, "decode", json_out="runs/decode.json", resume="skip budgets already in --json-out")
    args = p.parse_args()
    result = run(args)
    write_section(Path(args.md), args.section, markdown(args, result))
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot({**result, "model": args.model}, Path(args.plot))


if __name__ == "__main__":
    main()
