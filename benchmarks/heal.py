"""Healing a converted SmolLM2 by distillation: quality per token and per CPU-minute -> BENCHMARKS.md.

    python benchmarks/heal.py --model runs/smollm2-kv125 --tokens 131072 500000 --local-steps 200 --resume

Stages (each saved to --json-out when done; --resume skips finished ones, and an interrupted
`heal` stage continues from its last checkpoint):
  source, converted    perplexity on WikiText-2 test and PTB test (the evaluation texts only)
  throughput           one distillation step vs one plain `transformers` training step (all
                       parameters, CE, AdamW) of the source, same windows, side by side
  local                layer-wise healing only (`heal --tokens 0 --local-steps N`)
  local+distill N      end-to-end KL distillation of N tokens (each of --tokens), starting from `local`
  distill N            (with --distill-alone) the same distillation from the converted model
Training text: the Gutenberg corpus in ../shared/data/corpus (never the evaluation files).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from latentkv import load_model, load_text
from latentkv.evaluation.perplexity import perplexity
from latentkv.healing.run import HealConfig, heal

from common import add_output_args, section, write_outputs, write_section

TEXTS = ("wikitext2", "ptb")


def evaluate(path, args) -> dict:
    model, tok = load_model(path, progress=False)
    out = {}
    for name in TEXTS:
        out[name] = perplexity(model, tok, load_text(name), seq_len=args.seq_len, max_windows=args.max_windows,
                               progress=False).ppl
    return out


def heal_stage(student, out: Path, tokens: int, local: int, args) -> dict:
    cfg = HealConfig(tokens=tokens, seq_len=args.train_seq_len, batch_size=args.batch_size, lr=args.lr,
                     local_steps=local, save_every=args.save_every, seed=0)
    resume = (Path(str(out) + ".heal") / "run.json").is_file()
    t0 = time.perf_counter()
    report = heal(student, args.teacher, args.data, out, cfg, resume=resume, overwrite=not resume and out.exists())
    return {"heal": {k: v for k, v in report.items() if k != "local"}, "local": report.get("local"),
            "wall_s": round(time.perf_counter() - t0, 1), "lr": args.lr}


def throughput(args, student_path=None) -> dict:
    """Median seconds of 3 steps each, alternating, on the same (1, seq) window: a plain `transformers`
    training step of the source (all parameters, CE), a distillation step with a live teacher (full-vocab
    KL), and one reading the teacher's cached top-k (`heal --teacher-cache`: no teacher forward); each in
    float32 and under bf16 autocast (`heal --precision bf16`, what `auto` picks on a bf16 CPU or GPU)."""
    from latentkv.healing.loop import select_trainable
    from latentkv.healing.losses import kl_full, kl_topk, teacher_topk

    student, _ = load_model(student_path or args.model, progress=False)
    teacher, _ = load_model(args.teacher, progress=False)
    plain, _ = load_model(args.teacher, progress=False)
    student = select_trainable(student, HealConfig()).train()
    plain.train().requires_grad_(True)
    teacher.requires_grad_(False)
    opt_s = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-6)
    ids = torch.randint(0, plain.config.vocab_size, (1, args.train_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = teacher_topk(teacher(input_ids=ids).logits, HealConfig().teacher_topk)

    def step(loss_fn, model, opt, bf16: bool):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return run

    teacher_bf16 = load_model(args.teacher, progress=False, dtype=torch.bfloat16)[0].requires_grad_(False)

    def distill(frozen):
        def loss(model):
            with torch.no_grad():
                target = frozen(input_ids=ids).logits
            return kl_full(model(input_ids=ids).logits, target)
        return loss

    def cached_kl(model):
        return kl_topk(model(input_ids=ids).logits, *cached)

    steps = {}
    for tag, bf16, frozen in (("", False, teacher), ("_bf16", True, teacher_bf16)):  # as `heal`: a bf16 teacher
        steps.update({f"plain{tag}": step(lambda m: m(input_ids=ids, labels=ids).loss, plain, opt_p, bf16),
                      f"distill{tag}": step(distill(frozen), student, opt_s, bf16),
                      f"cached{tag}": step(cached_kl, student, opt_s, bf16)})
    times = {k: [] for k in steps}
    for _ in range(4):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # first call warms up
    out = {f"{k}_step_s": v for k, v in med.items()}
    out.update(ratio=med["distill"] / med["plain"], cached_ratio=med["cached"] / med["plain"],
               tokens_per_step=args.train_seq_len)
    return out


def step_lines(tp: dict) -> list[str]:
    """The step-time comparison as Markdown lines: a table of fp32 and bf16 steps, or (a result from before
    bf16 was timed) one sentence."""
    if "plain_bf16_step_s" not in tp:
        cached = (f"; reading the teacher's cached top-k instead {tp['cached_step_s']:.2f} s "
                  f"({tp['cached_ratio']:.2f}x)" if "cached_step_s" in tp else "")
        return [f"Step time for {tp['tokens_per_step']} tokens, side by side: plain transformers training step "
                f"{tp['plain_step_s']:.2f} s; distillation step {tp['distill_step_s']:.2f} s ({tp['ratio']:.2f}x)"
                f"{cached}."]
    n, base = tp["tokens_per_step"], tp["plain_step_s"]
    lines = ["| step | fp32 s | fp32 tokens/s | bf16 autocast s | bf16 tokens/s | bf16 speed-up | bf16 vs plain fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("plain", "plain transformers training step of the source (all weights, CE)"),
                        ("distill", "distillation, live teacher (full-vocab KL)"),
                        ("cached", "distillation, teacher's cached top-k (`--teacher-cache`)")):
        a, b = tp[f"{name}_step_s"], tp[f"{name}_bf16_step_s"]
        lines.append(f"| {label} | {a:.2f} | {n / a:.0f} | {b:.2f} | {n / b:.0f} | {a / b:.2f}x | {base / b:.2f}x |")
    return lines


def run(args) -> dict:
    path = Path(args.json_out)
    res = json.loads(path.read_text()) if args.resume and path.is_file() else {}

    def stage(name, fn):
        if name not in res:
            res[name] = fn()
            print(name, json.dumps(res[name])[:400], file=sys.stderr, flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=2))
        return res[name]

    work = Path(args.work)
    stage("source", lambda: evaluate(args.teacher, args))
    stage("converted", lambda: evaluate(args.model, args))
    stage("throughput", lambda: throughput(args))
    stage("local", lambda: {**heal_stage(args.model, work / "local", 0, args.local_steps, args),
                            **evaluate(work / "local", args)})
    for n in args.tokens:  # each budget is its own run (the cosine schedule depends on it)
        stage(f"local+distill {n}", lambda: {**heal_stage(work / "local", work / f"local-distill-{n}", n, 0, args),
                                             **evaluate(work / f"local-distill-{n}", args)})
        if args.distill_alone:
            stage(f"distill {n}", lambda: {**heal_stage(args.model, work / f"distill-{n}", n, 0, args),
                                           **evaluate(work / f"distill-{n}", args)})
    return res


def markdown(args, res: dict) -> str:
    src, conv = res["source"], res["converted"]
    tp = res["throughput"]
    intro = (f"fp32. Training text: {args.data} (packed {args.train_seq_len}-token windows, "
             f"{args.batch_size} per step, lr {args.lr}, attention weights only, KL(teacher||student)). Perplexity: "
             f"seq_len {args.seq_len}, first {args.max_windows} windows. Gap closed = (converted - healed) / "
             "(converted - source) in perplexity.")
    lines = [*step_lines(tp), "",
             "| stage | training tokens | wall s | WikiText-2 ppl | gap closed | PTB ppl | gap closed |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def row(name, r, tokens, wall):
        cells = []
        for t in TEXTS:
            closed = (conv[t] - r[t]) / (conv[t] - src[t]) if name not in ("source", "converted") else None
            cells += [f"{r[t]:.3f}", f"{closed:.1%}" if closed is not None else "-"]
        lines.append(f"| {name} | {tokens} | {wall} | " + " | ".join(cells) + " |")

    row("source", src, "-", "-")
    row("converted", conv, "-", "-")
    healed = [k for k in res if k == "local" or k.split(" ")[0] in ("local+distill", "distill")]
    for name in sorted(healed, key=lambda k: (res[k]["heal"]["tokens"], k)):
        r = res[name]
        row(name.split(" ")[0], r, f"{r['heal']['tokens']:,}", r["wall_s"])
    return section(args.section, f"Healing {args.model} by distillation from {args.teacher}", intro, lines)


def throughput_markdown(args, tp: dict) -> str:
    """The step-time comparison alone (--throughput-only), as its own section."""
    intro = (f"Student {args.model}, teacher {args.teacher}; one window of {tp['tokens_per_step']} random tokens; "
             "median of 3 steps after a warm-up, the six kinds alternating in one process. bf16 = `torch.autocast` "
             "with float32 weights, AdamW and loss (`heal --precision bf16`; `auto`, the default, picks it where the "
             "hardware multiplies bf16); the bf16 teacher is a bf16 copy, as `heal` loads it.")
    return section(args.section, "Healing step time: float32 against bf16 autocast", intro, step_lines(tp))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/smollm2-kv125", help="a latentkv convert output")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--data", default="../shared/data/corpus")
    p.add_argument("--tokens", type=int, nargs="+", default=[500_000], help="one distillation run per budget")
    p.add_argument("--local-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-seq-len", type=int, default=512)
    p.add_argument("--save-every", type=int, default=8)
    p.add_argument("--distill-alone", action="store_true", help="also distil from the converted model directly")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--work", default="runs/heal-bench")
    p.add_argument("--throughput-only", action="store_true",
                   help="only the step-time comparison, as its own section (use --section heal-step)")
    add_output_args(p, "heal", json_out="runs/heal-bench.json", resume="skip stages already in --json-out")
    args = p.parse_args()
    if args.throughput_only:
        tp = throughput(args)
        write_outputs(args, tp, throughput_markdown(args, tp))
        return
    write_section(Path(args.md), args.section, markdown(args, run(args)))


if __name__ == "__main__":
    main()
