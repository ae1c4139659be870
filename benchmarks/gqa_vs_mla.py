"""Fewer KV heads (--target gqa) against MLA at the same cache bytes, training-free and healed -> BENCHMARKS.md
("gqa-vs-mla").

    python benchmarks/gqa_vs_mla.py --kv-heads 1 --windows 16 --passkey 4096 --heal-tokens 131072 --resume

Rows: the source; `to_gqa` with --kv-heads K (a stock checkpoint of the source's class); the default MLA
conversion at the same share of the cache, K / G. Both calibrate on the same default mixture. With
--heal-tokens N each is saved under --work and healed by `latentkv heal` with its defaults (data: the
domain mixture, teacher: the source), as `latentkv heal DIR --teacher MODEL --data mix --tokens N` would;
an interrupted heal resumes. Perplexity on the first --windows windows of WikiText-2 and PTB test;
passkey at --passkey tokens (0: skip).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from latentkv import HealConfig, LowRankConfig, convert, heal, load_model, load_text, passkey, record_of, save, to_gqa

from common import add_output_args, passkey_phrase, ppl_row, section, write_outputs

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
    work = Path(args.work)
    gqa, mla = f"gqa {args.kv_heads} KV heads", f"mla {share:.1%}"
    kept = {gqa: work / f"gqa{args.kv_heads}", mla: work / f"mla{share * 100:.0f}"}  # used with --heal-tokens
    builds = {"source": lambda: source,
              gqa: lambda: to_gqa(source, args.kv_heads, tokenizer=tok, progress=False),
              mla: lambda: convert(source, LowRankConfig(kv_budget=share), tokenizer=tok, progress=False)}
    if args.heal_tokens:
        for name, base in kept.items():
            build = builds[name]
            builds[name] = lambda b=build, p=base: load_model(p, progress=False)[0] if p.is_dir() else b()
            builds[f"{name}, healed {args.heal_tokens:,}"] = healed(builds[name], base, args)
    for name, build in builds.items():
        if name in res:
            continue
        t0 = time.perf_counter()
        model, log = build(), None
        if isinstance(model, tuple):  # a healed build also names its training log
            model, log = model
        seconds = time.perf_counter() - t0
        if log:  # the heal may have run in an earlier process: its own step times say what it cost
            seconds = sum(json.loads(line)["time"] for line in log.read_text().splitlines() if line.strip())
        elif args.heal_tokens and name in kept and kept[name].is_dir():  # loaded: its record's time, if any
            seconds = (record_of(model) or {}).get("convert_seconds")
        res[name] = {"convert_s": None if seconds is None else round(seconds, 1), **measure(model, tok, args),
                     **({"heal_log": str(log)} if log else {})}
        print(name, json.dumps(res[name]), file=sys.stderr, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
    return res


def healed(build, base: Path, args):
    """A build of the model healed by `latentkv heal` defaults on the domain mixture: the converted
    model is saved to `base` and healed into `base-hNk` (both kept, reused when there)."""
    def run_heal():
        if not base.is_dir():
            model, tok = build(), load_model(args.model, progress=False)[1]
            if record_of(model) is None:  # the GQA merge is a stock model: stored as `convert --target gqa` does
                model.save_pretrained(base)
                tok.save_pretrained(base)
            else:
                save(model, tok, base)
        out = base.with_name(f"{base.name}-h{args.heal_tokens // 1000}k")
        if not out.is_dir():
            heal(base, args.model, "mix", out, HealConfig(tokens=args.heal_tokens), progress=False,
                 resume=(out.with_name(out.name + ".heal") / "run.json").is_file())
        return load_model(out, progress=False)[0], out / "heal_log.jsonl"
    return run_heal


def plot_heals(args, res: dict, logs: dict[str, Path]) -> None:
    """KL(teacher||student) per optimizer step against training tokens, one line per healed model."""
    from latentkv.io.plots import figure, plot_title

    share = min(r["cache_bytes_per_token"] for r in res.values()) / res["source"]["cache_bytes_per_token"]
    with figure(args.plot, title=plot_title(args.model, "fp32")) as (_, ax):
        for name, log in logs.items():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            ax.plot([r["tokens"] for r in rows], [r["kl"] for r in rows], lw=1.2,
                    label=f"{name} (WikiText-2 x{res[name]['wikitext2'] / res['source']['wikitext2']:.2f})")
        ax.set(xlabel="training tokens (domain mixture)", ylabel="KL(teacher || student) per token",
               title=f"Healing at {share:.0%} of the source's cache bytes: GQA merge vs MLA")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def markdown(args, res: dict) -> str:
    src = res["source"]
    healing = (f" Healed rows: `latentkv heal DIR --teacher {args.model} --data mix --tokens {args.heal_tokens}` with "
               "its defaults (KL to the source, attention weights, 512-token windows, 8 per step), the same for both; "
               f"their last column is the heal's own step time; curves in `{args.plot}`." if args.heal_tokens else "")
    intro = (f"Perplexity on the first {args.windows} windows of {args.seq_len} tokens of WikiText-2 "
             f"and PTB test; {passkey_phrase(args.passkey, args.trials)}; cache bytes "
             "per token at fp32 (the source's dtype here). `gqa`: `convert --target gqa`, a stock checkpoint; `mla`: "
             "the default conversion at the same share of the cache." + healing)
    lines = ["| model | cache bytes/token | share | wikitext2 | ptb | passkey | convert / heal s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        cells = " | ".join(f"{r[t]:.2f} (x{r[t] / src[t]:.2f})" for t in TEXTS)
        key = f"{r['passkey']:.0%}" if "passkey" in r else "-"
        lines.append(f"| {name} | {r['cache_bytes_per_token']:,} | {r['cache_bytes_per_token'] / src['cache_bytes_per_token']:.1%}"
                     f" | {cells} | {key} | {'-' if r['convert_s'] is None else r['convert_s']} |")
    return section(args.section, f"Fewer KV heads against MLA at equal bytes: {args.model}", intro, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--passkey", type=int, default=0)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--heal-tokens", type=int, default=0, help="also heal both with this many tokens (0: no)")
    p.add_argument("--work", default="runs", help="where converted and healed models are kept")
    add_output_args(p, "gqa-vs-mla", json_out="runs/gqa_vs_mla.json", resume="skip rows already in --json-out")
    p.add_argument("--plot", default="docs/heal-gqa-vs-mla.png", help="healing curves (with --heal-tokens)")
    args = p.parse_args()
    res = run(args)
    if args.heal_tokens:
        logs = {name: Path(r["heal_log"]) for name, r in res.items() if r.get("heal_log")}
        plot_heals(args, res, logs)
    write_outputs(args, res, markdown(args, res))


if __name__ == "__main__":
    main()
