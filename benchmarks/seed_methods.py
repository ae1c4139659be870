"""The seed methods as options, side by side at equal cache budgets -> BENCHMARKS.md ("seed-methods").

    python benchmarks/seed_methods.py --budgets 0.5 0.25 --windows 16 --resume

Each variant is `latentkv convert --kv-budget B` with one option changed from the defaults (the split
search still picks its rope/latent split on held-out calibration windows), all in one process with the
calibration windows and statistics shared:
  default                       rorope or rorope-fold2, chosen by the split search
  rope=low / rope=uniform       MHA2MLA's S_low and S_uniform partial-RoPE strategies (per-head pairs)
  rope=high / rope=2norm        MHA2MLA's S_high and S_2-norm
  rope=elite                    EliteKV's RoPElite: per-head greedy pairs by attention-output error
  kv_separate=true              DiffQKV-style separate key and value latents
  rank_allocation=spectrum      CARE-style global rank allocation by covariance-weighted error
  method=svd                    joint SVD of the weights, no calibration (the baseline)
Perplexity on the first --windows windows of --seq-len tokens of WikiText-2 and PTB test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from latentkv import convert, load_model, load_text
from latentkv.conversion.calibration import calibration_ids
from latentkv.conversion.configs import LowRankConfig, make_config

from common import add_output_args, ppl_row, section, write_outputs

TEXTS = ("wikitext2", "ptb")
VARIANTS = ("default", "rope=low", "rope=uniform", "rope=high", "rope=2norm", "rope=elite", "kv_separate=true",
            "rank_allocation=spectrum", "method=svd")


def knob(variant: str) -> dict:
    if variant == "default":
        return {}
    key, _, value = variant.partition("=")
    return {key: json.loads(value) if value in ("true", "false") else value}


def measure(model, tok, args, texts: dict) -> dict:
    return ppl_row(model, tok, texts, args.seq_len, args.windows)


def run(args) -> dict:
    path = Path(args.json_out)
    res = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    source, tok = load_model(args.model, progress=False)
    texts = {t: load_text(t) for t in TEXTS}
    if "source" not in res:
        res["source"] = measure(source, tok, args, texts)
    ids, cache = calibration_ids(tok, LowRankConfig(kv_budget=0.5))[0], {}
    for budget in args.budgets:
        for variant in args.variants:
            name = f"{budget:g} {variant}"
            if name in res:
                continue
            t0 = time.perf_counter()
            config = make_config(kv_budget=budget, **knob(variant))
            conv = convert(source, config, tokenizer=tok, calib_ids=None if config.method == "svd" else ids,
                           calib_cache=cache, progress=False)
            seconds = time.perf_counter() - t0
            dims = conv.model.layers[0].self_attn.dims
            record = conv.config.latentkv
            res[name] = {**measure(conv, tok, args, texts), "budget": budget, "variant": variant,
                         "split": f"{dims.qk_rope_head_dim}+{dims.kv_lora_rank}",
                         "rope": record["conversion"].get("rope"), "convert_seconds": round(seconds, 1)}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=2))
            print(name, json.dumps(res[name]), file=sys.stderr, flush=True)
    return res


def render(res: dict, args) -> str:
    src = res["source"]
    rows = ["| budget | variant | rope strategy | rope + latent (layer 0) | cache bytes/token | wikitext2 | ptb | "
            "convert s |", "|---:|---|---|---|---:|---:|---:|---:|",
            f"| - | source | - | - | {src['cache_bytes_per_token']:,} | {src['wikitext2']:.2f} | {src['ptb']:.2f} | - |"]
    # every row measured so far, by budget then variant (a later run for a few variants keeps the others)
    measured = [r for r in res.values() if "variant" in r]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(measured, key=lambda r: (-r["budget"], order.get(r["variant"], len(order)), r["variant"])):
        rows.append(f"| {r['budget']:.1%} | {r['variant']} | {r['rope'] or '-'} | {r['split']} | "
                    f"{r['cache_bytes_per_token']:,} | {r['wikitext2']:.2f} (x{r['wikitext2'] / src['wikitext2']:.2f}) "
                    f"| {r['ptb']:.2f} (x{r['ptb'] / src['ptb']:.2f}) | {r['convert_seconds']} |")
    intro = (f"WikiText-2 and PTB test, first {args.windows} windows of {args.seq_len} tokens; (x) = ratio to the "
             "source. Every variant is `convert --kv-budget B` with one option changed; the split search picks "
             "each one's rope/latent split on held-out calibration windows (default mixture), so no row sees test "
             "text before it is scored.")
    return section(args.section, f"Seed methods as options: {args.model}", intro, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    add_output_args(p, "seed-methods", "runs/seed_methods.json", resume="skip rows already in --json-out")
    args = p.parse_args()
    res = run(args)
    write_outputs(args, res, render(res, args))


if __name__ == "__main__":
    main()
