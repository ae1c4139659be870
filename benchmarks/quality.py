"""Perplexity, cache size (and passkey retrieval) of a source model and its conversions -> BENCHMARKS.md.

    python benchmarks/quality.py --variants source,exact,svd:0.5 --text wikitext2 --seq-len 2048
    python benchmarks/quality.py --model gemma3-270m --also ptb --passkey 1024,2048,4096 --trials 1 ...

Variants: `source`, `exact`, `svd:BUDGET`, `lowrank:BUDGET` (the calibrated default method), and
`lowrank:BUDGET:KEY=VALUE+KEY=VALUE` for LowRankConfig overrides (e.g. `rope=rorope-fold2`).
Calibration statistics are shared by all variants. Results go to a JSON file and to a section
of BENCHMARKS.md (replaced on re-run) that names the command that made them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from latentkv import convert, load_model, load_text
from latentkv.conversion.configs import make_config
from latentkv.evaluation.perplexity import perplexity
from latentkv.reports.sweep import evaluate_row

from common import add_output_args, section, write_section


def make_variant(source, tok, spec: str, cache: dict):
    """-> (model, convert seconds or None)."""
    if spec == "source":
        return source, None
    method, _, rest = spec.partition(":")
    budget, _, options = rest.partition(":")
    config = make_config(kv_budget=float(budget) if budget else None, method=method, **parse_options(options))
    t0 = time.perf_counter()
    model = convert(source, config, tokenizer=tok, calib_cache=cache)
    return model, time.perf_counter() - t0


def parse_options(options: str) -> dict:
    """"rope=rorope-fold2+rank_allocation=sensitivity" -> LowRankConfig overrides (numbers parsed)."""
    out = {}
    for item in filter(None, options.split("+")):
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def settings(args) -> dict:
    return {k: getattr(args, k) for k in ("model", "text", "seq_len", "max_windows", "passkey", "also", "trials")}


def load_checkpoint(args) -> list[dict]:
    """Rows already measured with the same settings (`--resume`), so a killed run goes on where it stopped."""
    path = Path(args.json_out)
    if not (args.resume and path.is_file()):
        return []
    saved = json.loads(path.read_text())
    return saved["rows"] if saved.get("settings") == settings(args) else []


def save_checkpoint(args, rows: list[dict]) -> None:
    path = Path(args.json_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings(args), "rows": rows}, indent=2))
    tmp.replace(path)


def run(args) -> list[dict]:
    source, tok = load_model(args.model)
    text = load_text(args.text)
    contexts = tuple(int(c) for c in args.passkey.split(",")) if args.passkey else ()
    rows, cache = load_checkpoint(args), {}
    done = {r["variant"] for r in rows}
    for spec in args.variants.split(","):
        if spec in done:
            continue
        model, conv_s = make_variant(source, tok, spec, cache)
        row = evaluate_row(model, tok, text, args.seq_len, args.max_windows, contexts, trials=args.trials)
        for name in filter(None, (args.also or "").split(",")):  # more texts, same windows
            row[f"ppl_{name}"] = perplexity(model, tok, load_text(name), seq_len=args.seq_len,
                                            max_windows=args.max_windows).ppl
        rows.append({"variant": spec, **row, "convert_seconds": conv_s and round(conv_s, 1),
                     "ppl_ratio": row["ppl"] / rows[0]["ppl"] if rows else 1.0})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        save_checkpoint(args, rows)
        del model
    return rows


def markdown(args, rows: list[dict]) -> str:
    passkey = "passkey_accuracy" in rows[0]
    also = [k for k in rows[0] if k.startswith("ppl_") and k != "ppl_ratio"]
    intro = (f"Protocol: `latentkv.perplexity` (seq_len {args.seq_len}, non-overlapping, token-weighted; "
             f"{args.max_windows or 'all'} windows per text); ratio = ppl / source ppl."
             + (f" Passkey: contexts {args.passkey}, 5 depths x {args.trials} trials each." if passkey else ""))
    extra = "".join(f" {k[4:]} ppl (ratio) |" for k in also)
    lines = ["| variant | rope + latent | cache values/token/layer | cache bytes/token (fp32) | ppl | ratio | tokens "
             f"| windows | convert s |{extra}{' passkey |' if passkey else ''}",
             "|---|---|" + "---:|" * (7 + len(also) + passkey)]
    for r in rows:
        split = f"{r['qk_rope_head_dim']} + {r['kv_lora_rank']}" if r["kv_lora_rank"] else "-"
        cells = "".join(f" {r[k]:.3f} (x{r[k] / rows[0][k]:.3f}) |" for k in also)
        lines.append(f"| {r['variant']} | {split} | {r['cache_values_per_token_per_layer']} | "
                     f"{r['cache_bytes_per_token']:,} | {r['ppl']:.4f} | {r['ppl_ratio']:.3f} | {r['tokens']:,} | "
                     f"{r['windows']} | {r['convert_seconds'] if r['convert_seconds'] is not None else '-'} |{cells}"
                     + (f" {r['passkey_accuracy']:.0%} |" if passkey else ""))
    return section(args.section, f"{args.model} on {args.text}: perplexity and cache size", intro, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", default="source,exact,svd:0.5,lowrank:0.5,lowrank:0.25,lowrank:0.125")
    p.add_argument("--text", default="wikitext2")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--passkey", help="also passkey accuracy at these contexts, e.g. 1024,2048,4096")
    p.add_argument("--trials", type=int, default=3, help="passkey trials per context and depth")
    p.add_argument("--also", help="more texts measured on the same windows, e.g. ptb")
    add_output_args(p, "wikitext2-full", json_out="runs/quality.json",
                    resume="skip variants already in --json-out with the same settings")
    args = p.parse_args()
    rows = run(args)
    write_section(Path(args.md), args.section, markdown(args, rows))


if __name__ == "__main__":
    main()
