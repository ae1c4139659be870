"""Ablations of the calibrated conversion on the *validation* text (never the test file).

    python benchmarks/ablation.py --dims 120+72,60+36 --grid attn_moment=0,0.3,0.5 rope=rorope,rorope-fold2

For each explicit split (latent + rope) and each value of each knob (the others at their defaults),
converts SmolLM2 and reports perplexity on `--windows` windows of WikiText-2 *valid* and the NLL on
the held-out calibration windows, side by side in one process (calibration statistics shared).
Results go to a JSON file and a BENCHMARKS.md section with the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from latentkv import LowRankConfig, convert, load_model, load_text
from latentkv.conversion.calibration import calibration_ids, held_out_nll, split_ids
from latentkv.evaluation.perplexity import perplexity

from common import add_output_args, section, write_outputs


def parse_grid(items: list[str]) -> list[tuple[str, object]]:
    """["attn_moment=0,0.3", "rope=rorope"] -> [("attn_moment", 0), ("attn_moment", 0.3), ("rope", "rorope")]."""
    out = []
    for item in items:
        key, _, values = item.partition("=")
        for v in values.split(","):
            try:
                out.append((key, json.loads(v)))
            except json.JSONDecodeError:
                out.append((key, v))
    return out


def run(args) -> list[dict]:
    model, tok = load_model(args.model)
    dev = load_text(args.text)
    ids, _ = calibration_ids(tok, LowRankConfig(kv_budget=0.5))
    held = split_ids(ids)[1]
    cache, rows = {}, []
    for dims in args.dims.split(","):
        r, p = (int(x) for x in dims.split("+"))
        for key, value in parse_grid(args.grid):
            t = time.perf_counter()
            config = LowRankConfig(kv_lora_rank=r, qk_rope_head_dim=p, **{key: value})
            conv = convert(model, config, tokenizer=tok, calib_ids=ids, calib_cache=cache, progress=False)
            seconds = time.perf_counter() - t
            ppl = perplexity(conv, tok, dev, seq_len=args.seq_len, max_windows=args.windows, progress=False)
            rows.append({"latent": r, "rope": p, "knob": key, "value": value, "dev_ppl": ppl.ppl,
                         "heldout_nll": held_out_nll(conv, held), "convert_seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown(args, rows: list[dict]) -> str:
    intro = (f"Dev perplexity on {args.windows} windows of {args.seq_len} tokens of {args.text}; held-out NLL on "
             "the 4 calibration windows kept out of the fit. Every other setting at its default.")
    table = ["| rope + latent | knob | value | dev ppl | held-out NLL | convert s |", "|---|---|---|---:|---:|---:|"]
    table += [f"| {r['rope']} + {r['latent']} | {r['knob']} | {r['value']} | {r['dev_ppl']:.3f} | "
              f"{r['heldout_nll']:.4f} | {r['convert_seconds']} |" for r in rows]
    return section(args.section, f"Ablations on {args.text} ({args.model})", intro, table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dims", default="120+72,60+36", help="latent+rope splits, comma-separated")
    p.add_argument("--grid", nargs="+", default=["attn_moment=0,0.3,0.5", "rope=rorope-fold2"])
    p.add_argument("--text", default="wikitext2-valid")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=1024)
    add_output_args(p, "ablation", json_out="runs/ablation.json")
    args = p.parse_args()
    if Path(args.text).name == "wiki.test.raw" or args.text in ("wikitext2", "ptb"):
        sys.exit("error: ablations choose settings, so they must not look at a test split; use wikitext2-valid")
    rows = run(args)
    write_outputs(args, rows, markdown(args, rows))


if __name__ == "__main__":
    main()
