"""Quality across kinds of text: the dev suite (perplexity ratio per domain, copy probe, passkey) for a
source model and its conversions, side by side -> BENCHMARKS.md.

    python benchmarks/domains.py --variants source,lowrank:0.5,lowrank:0.25,lowrank:0.125 --section domains

Variants as in quality.py (`lowrank:0.5:calib=wikitext2-valid` overrides a LowRankConfig field);
`+target` after a budget (`lowrank:0.5+target`) converts export-grade (`--target deepseek_v3`); a directory
(`runs/kv50-mix-healed`) is a saved conversion or a healed model, measured as it is.
Domains are `latentkv.io.domains` evaluation parts (never calibration or healing text): WikiText-2
test, PTB test, held-out Gutenberg fiction, this Python's standard library, installed packages'
READMEs. Ratio = ppl / the source's on the same text; `worst / wt2` = the largest domain ratio over
the WikiText-2 ratio (target <= 1.25). Copy = accuracy on the repeated half of random sequences
(lengths 64/256/1024, distances 0/512), also as a share of the source's; passkey at --passkey tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from latentkv import convert, load_model
from latentkv.conversion.configs import make_config
from latentkv.evaluation.passkey import passkey
from latentkv.evaluation.suite import dev_suite
from latentkv.io.domains import DEV_DOMAINS

from common import add_output_args, section, write_section
from quality import parse_options


def make_variant(source, tok, spec: str, cache: dict):
    """'source' | a saved model's directory (converted or healed: measured as it is) |
    'METHOD:BUDGET[+target][:KEY=VALUE+...]' -> (model, convert seconds or None, record or None)."""
    if spec == "source":
        return source, None, None
    if Path(spec).is_dir():
        model = load_model(spec, progress=False)[0]
        return model, None, model.config.latentkv
    method, _, rest = spec.partition(":")
    budget, _, options = rest.partition(":")
    budget, _, target = budget.partition("+")
    opts = parse_options(options)  # explicit dims (kv_lora_rank=..+qk_rope_head_dim=..) stand for the budget
    config = make_config(kv_budget=None if "kv_lora_rank" in opts else float(budget), method=method,
                         target="deepseek_v3" if target else None, **opts)
    t0 = time.perf_counter()
    model = convert(source, config, tokenizer=tok, calib_cache=cache)
    return model, round(time.perf_counter() - t0, 1), model.config.latentkv


def measure(model, tok, args) -> dict:
    row = dev_suite(model, tok, seq_len=args.seq_len, max_windows=args.windows, progress=False)
    if args.passkey:
        row["passkey"] = passkey(model, tok, contexts=(args.passkey,), trials=args.trials, progress=False)
    return row


def run(args) -> list[dict]:
    path = Path(args.json_out)
    rows = json.loads(path.read_text())["rows"] if args.resume and path.is_file() else []
    done = {r["variant"] for r in rows}
    source, tok = load_model(args.model)
    cache = {}
    for spec in args.variants.split(","):
        if spec in done:
            continue
        model, seconds, record = make_variant(source, tok, spec, cache)
        row = {"variant": spec, "convert_seconds": seconds, **measure(model, tok, args)}
        if record is not None:
            first = record["layers"][0]
            search = record.get("split_search") or {}
            alloc = search.get("allocation") or {}
            spread = f" allocated, exact {alloc.get('protected', [])}" if alloc.get("used") == "allocated" else ""
            skip = f", s={search['rope_skip']}" if search.get("rope_skip") else ""
            slot0 = f" (a={search['rope_slot0']}{skip})" if search.get("rope_slot0") else ""
            row.update(split=f"{first['qk_rope_head_dim']}+{first['kv_lora_rank']}{slot0}{spread}",
                       calib=record["conversion"].get("calib"), calib_fingerprint=record.get("calibration"),
                       allocation=alloc or None)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "copy"}), file=sys.stderr, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows}, indent=2))
    return rows


def passkey_setting(rows: list[dict]) -> str:
    """'4096 tokens, 5 depths x 3 trials' from the rows that ran passkey (runs may differ in --passkey)."""
    cells = {(x["context"], x["trials"]) for r in rows if "passkey" in r for x in r["passkey"]["rows"]}
    depths = max((len(r["passkey"]["rows"]) for r in rows if "passkey" in r), default=0)
    return "; ".join(f"{c} tokens, {depths} depths x {t} trials" for c, t in sorted(cells)) or "not run"


def markdown(args, rows: list[dict]) -> str:
    src = next(r for r in rows if r["variant"] == "source")
    intro = (f"Perplexity on the first {args.windows} windows of {args.seq_len} tokens of each domain's evaluation "
             "part (`latentkv.io.domains`); ratio = ppl / source ppl; `worst / wt2` = largest domain ratio / WikiText-2 "
             "ratio (target <= 1.25). Copy: greedy accuracy on the second copy of random token sequences "
             "(`latentkv.evaluation.copy`, lengths 64/256/1024, distances 0/512, 4 sequences each, seed 0), and its "
             f"share of the source's. Passkey: {passkey_setting(rows)} ('-': not run for that row; the "
             "json has every row's settings). "
             "Calibration: `calib` column (`mix` = the default domain mixture, `conversion.mixture`).")
    head = "| variant | calib | split | " + " | ".join(DEV_DOMAINS) + " | worst / wt2 | copy | copy / source | passkey |"
    lines = [head, "|---|---|---|" + "---:|" * (len(DEV_DOMAINS) + 4)]
    for r in rows:
        ratios = {d: r["domains"][d]["ppl"] / src["domains"][d]["ppl"] for d in DEV_DOMAINS}
        cells = [f"{r['domains'][d]['ppl']:.2f} (x{ratios[d]:.2f})" for d in DEV_DOMAINS]
        worst = max(ratios.values()) / ratios["wikitext2"]
        copy, src_copy = r["copy"]["accuracy"], src["copy"]["accuracy"]
        pk = f"{r['passkey']['accuracy']:.0%}" if "passkey" in r else "-"
        lines.append(f"| {r['variant']} | {r.get('calib') or '-'} | {r.get('split', '-')} | " + " | ".join(cells)
                     + f" | {worst:.2f} | {copy:.1%} | {copy / src_copy:.0%} | {pk} |")
    lines += ["", "Copy probe per length and distance (accuracy):", "",
              "| variant | " + " | ".join(f"L{x['length']} d{x['distance']}" for x in src["copy"]["rows"]) + " |",
              "|---|" + "---:|" * len(src["copy"]["rows"])]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{x['accuracy']:.1%}" for x in r["copy"]["rows"]) + " |")
    return section(args.section, f"Quality across domains: {args.model}", intro, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", default="source,lowrank:0.5,lowrank:0.25,lowrank:0.125")
    p.add_argument("--windows", type=int, default=8, help="perplexity windows per domain")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--passkey", type=int, default=4096, help="passkey context in tokens (0: skip)")
    p.add_argument("--trials", type=int, default=3, help="passkey trials per depth")
    add_output_args(p, "domains", json_out="runs/domains.json", resume="skip variants already in --json-out")
    args = p.parse_args()
    rows = run(args)
    write_section(Path(args.md), args.section, markdown(args, rows))


if __name__ == "__main__":
    main()
