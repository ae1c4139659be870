"""The cost of exporting to DeepSeek-V3, per budget, on the bundled SmolLM2 -> BENCHMARKS.md.

    python benchmarks/export.py --budgets 0.5,0.25,0.125 --max-windows 16

For each budget: convert with the choices the export can express (`--rope rorope-export`, no
latent bias) and measure perplexity; fit the latent RMSNorm stock engines apply (latent_norm.py)
on the same calibration windows and measure again; then save, export, and run `verify-export`
(stock transformers vs our runtime). The default non-exportable conversion (`--rope rorope`)
is measured too, so the table shows what exportability itself costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from latentkv import LowRankConfig, convert, load_model, load_text, save
from latentkv.conversion.calibration import calibration_ids, split_ids
from latentkv.conversion.latent_norm import add_latent_norm
from latentkv.deepseek.export import export
from latentkv.evaluation.perplexity import perplexity
from latentkv.reports.verify import verify_export

from common import add_output_args, section, write_section
from quality import load_checkpoint, save_checkpoint


def ppl(model, tok, text, args) -> float:
    return perplexity(model, tok, text, seq_len=args.seq_len, max_windows=args.max_windows, progress=False).ppl


def budget_row(source, tok, text, budget: float, ids, cache: dict, args) -> dict:
    row = {"budget": budget}
    default = convert(source, LowRankConfig(kv_budget=budget), tokenizer=tok, calib_ids=ids, calib_cache=cache)
    row["ppl_rorope"] = ppl(default, tok, text, args)
    del default
    t0 = time.perf_counter()
    conv = convert(source, LowRankConfig(kv_budget=budget, rope="rorope-export"), tokenizer=tok, calib_ids=ids,
                   calib_cache=cache)
    row["convert_seconds"] = round(time.perf_counter() - t0, 1)
    dims = conv.model.layers[0].self_attn.dims
    row.update(kv_lora_rank=dims.kv_lora_rank, qk_rope_head_dim=dims.qk_rope_head_dim,
               ppl_export_no_norm=ppl(conv, tok, text, args))
    t0 = time.perf_counter()
    fit = add_latent_norm(conv, split_ids(ids)[0])
    row["norm_fit_seconds"] = round(time.perf_counter() - t0, 1)
    row["kv_b_relative_error"] = sum(f["kv_b_relative_error"] for f in fit["layers"]) / len(fit["layers"])
    row["ppl_export_norm"] = ppl(conv, tok, text, args)
    with tempfile.TemporaryDirectory(dir="runs") as tmp:
        save(conv, tok, Path(tmp) / "native")
        export(conv, Path(tmp) / "ds", tokenizer=tok)
        check = verify_export(Path(tmp) / "ds", Path(tmp) / "native")
    row.update({k: check[k] for k in ("max_abs_diff", "greedy_agreement", "generation_match", "passed")})
    return row


def run(args) -> list[dict]:
    source, tok = load_model(args.model)
    text = load_text(args.text)
    ids, _ = calibration_ids(tok, LowRankConfig(kv_budget=0.5))
    rows, cache = load_checkpoint(args), {}
    if not rows:
        rows.append({"budget": 1.0, "source_ppl": ppl(source, tok, text, args)})
        save_checkpoint(args, rows)
    done = {r["budget"] for r in rows}
    for budget in (float(b) for b in args.budgets.split(",")):
        if budget not in done:
            rows.append(budget_row(source, tok, text, budget, ids, cache, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            save_checkpoint(args, rows)
    return rows


def markdown(args, rows: list[dict]) -> str:
    src = rows[0]["source_ppl"]
    intro = (f"Perplexity on {args.text}, seq_len {args.seq_len}, first "
             f"{args.max_windows} windows; source ppl {src:.4f}. Ratios are ppl / source ppl. `rorope` is the default "
             "(not exportable) conversion; `export` keeps the m fastest frequencies (rope_theta^(p/d)) and a "
             "bias-free latent; `+ norm` adds the fitted `kv_a_layernorm`. Verify: stock transformers vs our "
             "runtime on 128 tokens (fp32).")
    lines = ["| budget | rope + latent | rorope | export, no norm | export + norm | norm cost | kv_b fit error "
             "| verify max abs diff | greedy agree | convert s |", "|---:|---|" + "---:|" * 8]
    for r in rows[1:]:
        lines.append(f"| {r['budget']:g} | {r['qk_rope_head_dim']} + {r['kv_lora_rank']} | "
                     f"{r['ppl_rorope']:.3f} ({r['ppl_rorope'] / src:.3f}) | "
                     f"{r['ppl_export_no_norm']:.3f} ({r['ppl_export_no_norm'] / src:.3f}) | "
                     f"{r['ppl_export_norm']:.3f} ({r['ppl_export_norm'] / src:.3f}) | "
                     f"{r['ppl_export_norm'] / r['ppl_export_no_norm'] - 1:+.2%} | {r['kv_b_relative_error']:.2e} | "
                     f"{r['max_abs_diff']:.1e} | {r['greedy_agreement']:.0%} | {r['convert_seconds']} |")
    title = f"DeepSeek-V3 export of {args.model}: what the latent norm and exportable RoPE cost"
    return section(args.section, title, intro, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", default="0.5,0.25,0.125")
    p.add_argument("--text", default="wikitext2")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16)
    add_output_args(p, "export-latent-norm", json_out="runs/export.json",
                    resume="skip budgets already in --json-out with the same settings")
    args = p.parse_args()
    args.passkey = None  # quality.settings() keys
    rows = run(args)
    write_section(Path(args.md), args.section, markdown(args, rows))


if __name__ == "__main__":
    main()
