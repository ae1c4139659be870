"""What users deploy, per KV budget: native vs export-grade (training-free and healed), every export
checked by `verify-export` against stock transformers -> BENCHMARKS.md ("deploy") and a plot of
WikiText-2 ppl ratio against healing tokens.

    python benchmarks/deploy.py --budgets 0.5 0.25 0.125 --tokens 131072 500000 --resume

Stages (each saved to --json-out as it finishes, and the section re-written; --resume skips finished
ones, and an interrupted heal continues from its last checkpoint):
  source            the dev suite on the source
  throughput        one distillation step (live teacher; cached teacher top-k) vs one plain
                    `transformers` training step, side by side, on the first budget's export-grade model
  native B          `convert --kv-budget B` with default flags
  export B          `convert --kv-budget B --target deepseek_v3`, exported, verified
  healed B N [| R]  `heal` of `export B` on the domain mixture (`heal --data mix`) for N tokens, exported,
                    verified; all runs share one teacher top-k cache, so the teacher runs once per window;
                    R tags a recipe other than heal's defaults (--train, --batch-size, --train-seq-len,
                    --long-*, --lr), so a resume with other heal flags makes new rows beside the old
  protocol ROW      after the others, for every row: WikiText-2 and PTB test on --protocol-windows windows
                    (the issue's headline protocol), passkey at --protocol-passkey tokens
Measured for every row: the dev suite (each domain's evaluation part, --windows x --seq-len), the copy
probe, passkey at --passkey tokens (0: skip). Healing and calibration never read evaluation text.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from latentkv import HealConfig, convert, export, heal, load_model, save
from latentkv.conversion.configs import make_config
from latentkv.evaluation.passkey import passkey
from latentkv.evaluation.suite import dev_suite
from latentkv.healing.run import TRAINABLE
from latentkv.io.domains import DEV_DOMAINS
from latentkv.io.plots import figure, plot_title, readable_log_axes
from latentkv.reports.verify import verify_export
from latentkv.runtime.generation import greedy_continuation

from common import add_output_args, passkey_phrase, section, write_section
from domains import measure
from heal import step_lines, throughput

PROTOCOL = ("wikitext2", "ptb")  # the headline protocol, beside the dev suite


def converted(source, tok, budget: float, target: bool, out: Path, cache: dict) -> dict:
    """Convert at `budget` (export-grade when `target`), save to `out` -> {convert_s, split}."""
    config = make_config(kv_budget=budget, target="deepseek_v3" if target else None)
    t0 = time.perf_counter()
    model = convert(source, config, tokenizer=tok, calib_cache=cache)
    seconds = round(time.perf_counter() - t0, 1)
    save(model, tok, out, overwrite=True)
    first = model.config.latentkv["layers"][0]
    search = model.config.latentkv.get("split_search") or {}
    slot0, skip = search.get("rope_slot0"), search.get("rope_skip")
    return {"convert_s": seconds, "split": f"{first['qk_rope_head_dim']}+{first['kv_lora_rank']}"
            + (f" (a={slot0}{f', s={skip}' if skip else ''})" if slot0 else ""),
            "calib_fingerprint": model.config.latentkv.get("calibration")}


def exported(model_dir: Path) -> dict:
    """Export `model_dir` next to itself and verify it with stock transformers -> verify-export's result."""
    model, tok = load_model(model_dir, progress=False)
    ds = model_dir.with_name(model_dir.name + "-ds")
    t0 = time.perf_counter()
    export(model, ds, tokenizer=tok, overwrite=True)
    res = verify_export(ds, model_dir, progress=False)
    return {**res, "export_s": round(time.perf_counter() - t0, 1)}


def measured(path, args) -> dict:
    model, tok = load_model(path, progress=False)
    return measure(model, tok, args)


def healed(export_dir: Path, out: Path, tokens: int, args) -> dict:
    cfg = HealConfig(tokens=tokens, seq_len=args.train_seq_len, batch_size=args.batch_size, lr=args.lr,
                     train=args.train, long_seq_len=args.long_seq_len, long_every=args.long_every,
                     save_every=args.save_every, seed=0)
    resume = (Path(str(out) + ".heal") / "run.json").is_file()
    t0 = time.perf_counter()
    report = heal(export_dir, args.teacher, "mix", out, cfg, resume=resume, overwrite=not resume and out.exists(),
                  teacher_cache=Path(args.work) / "teacher-topk")
    return {"heal": {k: v for k, v in report.items() if k != "local"}, "heal_s": round(time.perf_counter() - t0, 1)}


def reused(args) -> dict:
    """Rows of a `benchmarks/domains.py` json measured with this run's protocol, by its variant names
    ('source', 'lowrank:B', 'lowrank:B+target'): the same conversion (same defaults, calibration
    fingerprint checked) need not be measured twice."""
    if not args.reuse:
        return {}
    rows = json.loads(Path(args.reuse).read_text())["rows"]
    same = [r for r in rows if (r["seq_len"], r["max_windows"]) == (args.seq_len, args.windows)
            and (args.passkey == 0 or any(x["context"] == args.passkey for x in r.get("passkey", {}).get("rows", [])))]
    return {r["variant"]: {**r, "measured_by": f"benchmarks/domains.py ({args.reuse})"} for r in same}


def run(args) -> dict:
    path, work = Path(args.json_out), Path(args.work)
    res = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    old = reused(args)
    source, tok = load_model(args.teacher, progress=False)
    cache: dict = {}

    def stage(name, fn):
        if name not in res:
            res[name] = fn()
            print(name, json.dumps({k: v for k, v in res[name].items() if k not in ("copy", "domains")})[:400],
                  file=sys.stderr, flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=2))
            write_section(Path(args.md), args.section, markdown(args, res))
            plot(res, Path(args.plot), args.teacher)

    stage("source", lambda: old.get("source") or measure(source, tok, args))
    first = args.budgets[0]
    for b in args.budgets:
        nat, exp = work / f"native-{b}", work / f"export-{b}"
        stage(f"native {b}", lambda: native_stage(source, tok, b, nat, cache, old.get(f"lowrank:{b}"), args))
        stage(f"export {b}", lambda: export_stage(source, tok, b, exp, cache, old.get(f"lowrank:{b}+target"), args))
        if b == first and not args.no_throughput:
            stage("throughput", lambda: throughput(args, exp))
        for n in args.tokens:  # each its own run: the cosine schedule depends on the token budget
            name = healed_name(b, n, recipe(args))
            out = row_dir(work, name)
            stage(name, lambda: {**healed(exp, out, n, args), "verify": exported(out), **measured(out, args)})
    if args.protocol_windows:
        for name in [n for n in list(res) if n == "source" or n.split(" ")[0] in ("native", "export", "healed")]:
            stage(f"protocol {name}", lambda: protocol(row_model(name, source, tok, cache, args), tok, args))
    return res


def row_model(name: str, source, tok, cache: dict, args):
    """The model a row measured: the source, or its saved directory (a reused native row is converted
    again, with the same defaults)."""
    if name == "source":
        return source
    path = row_dir(Path(args.work), name)
    kind, budget, *_ = name.split(" ")
    if not path.is_dir():
        converted(source, tok, float(budget), kind != "native", path, cache)
    return load_model(path, progress=False)[0]


def protocol(model, tok, args) -> dict:
    """The issue's headline numbers: WikiText-2 and PTB test on --protocol-windows x --seq-len, passkey."""
    row = dev_suite(model, tok, domains=PROTOCOL, seq_len=args.seq_len, max_windows=args.protocol_windows,
                    copy=False, progress=False)
    if args.protocol_passkey:
        row["passkey"] = passkey(model, tok, contexts=(args.protocol_passkey,), trials=args.trials, progress=False,
                                 continuation=lambda ids, n: greedy_continuation(model, ids, n))
    return row


def native_stage(source, tok, budget: float, out: Path, cache: dict, old: dict | None, args) -> dict:
    """Convert with default flags; measure unless `old` measured this same conversion."""
    row = converted(source, tok, budget, False, out, cache)
    return {**row, **(same_measure(row, old) or measured(out, args))}


def export_stage(source, tok, budget: float, out: Path, cache: dict, old: dict | None, args) -> dict:
    """Convert export-grade, export, verify; measure unless `old` measured this same conversion."""
    row = {**converted(source, tok, budget, True, out, cache), "verify": exported(out)}
    return {**row, **(same_measure(row, old) or measured(out, args))}


def same_measure(row: dict, old: dict | None) -> dict | None:
    """`old`'s measurements when it is the same conversion: same calibration text and the same split
    (a changed default, e.g. the RoPE strategy or the rotary schedule, changes the split string)."""
    if old is None or (old.get("calib_fingerprint"), old.get("split")) != (row["calib_fingerprint"], row["split"]):
        return None
    return {k: v for k, v in old.items() if k not in ("variant", "convert_seconds", "split")}


def recipe(args) -> str:
    """The healing recipe as a short tag, e.g. 'attention 8x512 lr0.0002' or 'all 4x512+4096/3 lr0.0002':
    part of a healed stage's name, so --resume with other heal flags runs new stages instead of reusing rows."""
    long = f"+{args.long_seq_len}/{args.long_every}" if args.long_every else ""
    return f"{args.train} {args.batch_size}x{args.train_seq_len}{long} lr{args.lr:g}"


DEFAULT_RECIPE = recipe(argparse.Namespace(train=HealConfig.train, batch_size=HealConfig.batch_size,
                                           train_seq_len=HealConfig.seq_len, long_seq_len=HealConfig.long_seq_len,
                                           long_every=HealConfig.long_every, lr=HealConfig.lr))


def healed_name(budget: float, tokens: int, tag: str) -> str:
    """'healed B N' for heal's default recipe (the name older runs' json holds), else 'healed B N | tag'."""
    return f"healed {budget} {tokens}" + ("" if tag == DEFAULT_RECIPE else f" | {tag}")


def row_dir(work: Path, name: str) -> Path:
    """A row's model folder under --work: native-B, export-B, export-B-healed-N[-tag]."""
    head, _, tag = name.partition(" | ")
    kind, budget, *tokens = head.split(" ")
    if kind != "healed":
        return work / f"{kind}-{budget}"
    return work / (f"export-{budget}-healed-{tokens[0]}" + (f"-{re.sub(r'[^A-Za-z0-9.+]', '-', tag)}" if tag else ""))


def rows(res: dict):
    """(name, budget, form, tokens, recipe, row) for every measured conversion, in json order."""
    for name, r in res.items():
        head, _, tag = name.partition(" | ")
        kind, *rest = head.split(" ")
        if kind in ("native", "export", "healed"):
            tokens = int(rest[1]) if kind == "healed" else 0
            yield name, float(rest[0]), kind, tokens, (tag or DEFAULT_RECIPE) if kind == "healed" else "", r


def ordered(res: dict):
    """rows() by budget (largest first), then native / export / healed, then recipe, then healing tokens."""
    return sorted(rows(res), key=lambda x: (-x[1], ("native", "export", "healed").index(x[2]), x[4], x[3]))


def markdown(args, res: dict) -> str:
    src = res["source"]
    intro = (f"Dev suite: first {args.windows} windows of {args.seq_len} tokens of each domain's evaluation part; "
             "ratio = ppl / source ppl; copy = the copy probe's accuracy as a share of the source's; "
             f"{passkey_phrase(args.passkey)}. `export` = `convert --target deepseek_v3` (default flags); `healed` = "
             f"`heal` of that model on the domain mixture ({args.batch_size} x {args.train_seq_len}-token windows per "
             f"step, lr {args.lr}, {args.train} weights{long_phrase(args)}). verify = `verify-export` (stock "
             "transformers vs our runtime: max abs logit diff, greedy output identical). *: the suite numbers come "
             "from `benchmarks/domains.py` (--reuse; same protocol and the same conversion, its calibration "
             "fingerprint checked).")
    lines = ["| budget | form | heal tokens | " + " | ".join(DEV_DOMAINS) + " | worst / wt2 | copy | passkey | verify "
             "| convert s | heal s |", "|---:|---|---:|" + "---:|" * (len(DEV_DOMAINS) + 3) + "---|---:|---:|"]
    s, current = src["domains"], recipe(args)
    lines.append(f"| - | source{'*' if 'measured_by' in src else ''} | - | " + " | ".join(f"{s[d]['ppl']:.2f}" for d in DEV_DOMAINS)
                 + f" | 1.00 | {src['copy']['accuracy']:.1%} | {passkey_cell(src)} | - | - | - |")
    for _, budget, kind, tokens, tag, r in ordered(res):
        ratio = {d: r["domains"][d]["ppl"] / s[d]["ppl"] for d in DEV_DOMAINS}
        cells = " | ".join(f"{r['domains'][d]['ppl']:.2f} (x{ratio[d]:.2f})" for d in DEV_DOMAINS)
        v = r.get("verify")
        verify = "-" if v is None else (f"{'passed' if v['passed'] else 'FAILED'} ({v['max_abs_diff']:.1e}"
                                        + ("" if v["generation_match"] else ", generation differs") + ")")
        heal_s = r.get("heal_s", "-")
        split = r.get("split") or res.get(f"export {budget}", {}).get("split", "")
        star = "*" if "measured_by" in r else ""
        lines.append(f"| {budget:.1%} | {form(kind, tag, current)}{star} {split} | {tokens or '-'} | {cells} | "
                     f"{max(ratio.values()) / ratio['wikitext2']:.2f} | "
                     f"{r['copy']['accuracy'] / src['copy']['accuracy']:.0%} | {passkey_cell(r)} | {verify} | "
                     f"{r.get('convert_s', r.get('convert_seconds')) or '-'} | {heal_s} |")
    lines += protocol_table(args, res)
    if "throughput" in res:
        lines += ["", *step_lines(res["throughput"])]
    lines += ["", f"Plot: `{args.plot}` (WikiText-2 ratio against healing tokens, per budget; dashed: native)."]
    return section(args.section, f"Deployable quality per budget: {args.teacher}", intro, lines)


def protocol_table(args, res: dict) -> list[str]:
    """WikiText-2 and PTB test on more windows, and passkey, for every row measured so far."""
    src = res.get("protocol source")
    if src is None:
        return []
    w = src["max_windows"]
    lines = ["", f"Headline protocol (stage `protocol`): WikiText-2 and PTB test, first {w} windows of "
             f"{src['seq_len']} tokens; {passkey_phrase(args.protocol_passkey, args.trials)}.", "",
             "| budget | form | heal tokens | wikitext2 | ptb | passkey |", "|---:|---|---:|---:|---:|---:|"]
    s, current = src["domains"], recipe(args)
    lines.append("| - | source | - | " + " | ".join(f"{s[d]['ppl']:.2f}" for d in PROTOCOL)
                 + f" | {passkey_cell(src)} |")
    for name, budget, kind, tokens, tag, r in ordered(res):
        p = res.get(f"protocol {name}")
        if p is not None:
            cells = " | ".join(f"{p['domains'][d]['ppl']:.2f} (x{p['domains'][d]['ppl'] / s[d]['ppl']:.3f})"
                               for d in PROTOCOL)
            lines.append(f"| {budget:.1%} | {form(kind, tag, current)} {r.get('split', '')} | {tokens or '-'} | "
                         f"{cells} | {passkey_cell(p)} |")
    return lines


def form(kind: str, tag: str, current: str) -> str:
    """The table's form cell: a healed row names its recipe when it is not the one the intro describes."""
    return f"{kind} ({tag})" if kind == "healed" and tag != current else kind


def long_phrase(args) -> str:
    if not args.long_every:
        return ""
    return f"; one step in {args.long_every} is one {args.long_seq_len}-token window instead (live teacher)"


def passkey_cell(r: dict) -> str:
    """Strict accuracy, and where measured the share whose answer's first number is the key."""
    if "passkey" not in r:
        return "-"
    p = r["passkey"]
    return f"{p['accuracy']:.0%}" + (f" ({p['found_accuracy']:.0%} by number)" if "found_accuracy" in p else "")


def plot(res: dict, path: Path, model: str = "model") -> None:
    """WikiText-2 ratio against healing tokens: one curve per budget and recipe, from its training-free export."""
    src = res["source"]["domains"]["wikitext2"]["ppl"]
    by_budget: dict[float, dict] = {}
    for _, budget, kind, tokens, tag, r in rows(res):
        d = by_budget.setdefault(budget, {"native": None, "export": None, "curves": {}})
        ratio = r["domains"]["wikitext2"]["ppl"] / src
        if kind == "healed":
            d["curves"].setdefault(tag, []).append((tokens, ratio))
        else:
            d[kind] = ratio
    path.parent.mkdir(parents=True, exist_ok=True)
    with figure(path, title=plot_title(model, "float32")) as (plt, ax):
        for i, (budget, d) in enumerate(sorted(by_budget.items(), reverse=True)):
            color, start = f"C{i}", [(0, d["export"])] if d["export"] is not None else []
            for j, (tag, curve) in enumerate(sorted(d["curves"].items()) or [(DEFAULT_RECIPE, [])]):
                xs, ys = zip(*sorted(start + curve)) if start or curve else ((), ())
                label = f"{budget:.1%} export-grade" + (f", healed {tag}" if len(d["curves"]) > 1 else "")
                ax.plot(xs, ys, "o" + ("-", "-.", ":")[j % 3], color=color, label=label)
            if d["native"] is not None:
                ax.axhline(d["native"], color=color, ls="--", lw=1, label=f"{budget:.1%} native, training-free")
        ax.set_xlabel("healing tokens (0: training-free)")
        ax.set_ylabel("WikiText-2 ppl / source ppl")
        ax.set_yscale("log")
        ticks = [round(y, 2) for d in by_budget.values()
                 for y in [d["native"], d["export"], *(r for c in d["curves"].values() for _, r in c)] if y]
        readable_log_axes(ax, yticks=spaced(ticks))  # the measured ratios as labels
        if by_budget:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines run edge to edge


def spaced(values: list[float], factor: float = 1.2) -> list[float]:
    """Sorted values, dropping any within `factor` of the last one kept, so log-axis labels do not overlap."""
    kept: list[float] = []
    for v in sorted(values):
        if not kept or v >= kept[-1] * factor:
            kept.append(v)
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2-135m", help="the source model (and distillation teacher)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    p.add_argument("--tokens", type=int, nargs="*", default=[131072, 500000], help="one healing run per count")
    p.add_argument("--windows", type=int, default=16, help="perplexity windows per domain")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--passkey", type=int, default=4096, help="passkey context (0: skip)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--lr", type=float, default=HealConfig.lr, help="default: heal's")
    p.add_argument("--batch-size", type=int, default=HealConfig.batch_size, help="default: heal's")
    p.add_argument("--train-seq-len", type=int, default=HealConfig.seq_len, help="default: heal's")
    p.add_argument("--train", choices=TRAINABLE, default=HealConfig.train, help="default: heal's")
    p.add_argument("--long-seq-len", type=int, default=HealConfig.long_seq_len, help="with --long-every: heal's "
                   "long windows (e.g. 4096; the within-0.5M recipe, README 'Healing')")
    p.add_argument("--long-every", type=int, default=HealConfig.long_every, help="default: heal's (0: none)")
    p.add_argument("--save-every", type=int, default=8)
    p.add_argument("--reuse", help="a benchmarks/domains.py json whose rows of the same protocol stand in for "
                   "measuring source, lowrank:B and lowrank:B+target again")
    p.add_argument("--protocol-windows", type=int, default=16, help="WikiText-2 and PTB windows of the headline "
                   "protocol, measured for every row after the others (0: skip)")
    p.add_argument("--protocol-passkey", type=int, default=4096, help="its passkey context (0: skip)")
    p.add_argument("--no-throughput", action="store_true", help="skip the step-time comparison")
    p.add_argument("--work", default="runs/deploy")
    p.add_argument("--plot", default="docs/deploy.png")
    add_output_args(p, "deploy", json_out="runs/deploy.json", resume="skip stages already in --json-out")
    args = p.parse_args()
    run(args)


if __name__ == "__main__":
    main()
