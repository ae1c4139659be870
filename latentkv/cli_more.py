"""Command-line wiring of `heal` (latentkv.healing) and `doctor` (latentkv.doctor)."""

from __future__ import annotations

import dataclasses


def run_heal(a) -> dict:
    from .healing import HealConfig, heal

    import os

    a.quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun/accelerate only rank 0 prints
    fields = {f.name for f in dataclasses.fields(HealConfig)}
    config = HealConfig(**{k: v for k, v in vars(a).items() if k in fields and v is not None})
    return heal(a.model, a.teacher, a.data, a.out, config, overwrite=a.overwrite, resume=a.resume,
                work_dir=a.work_dir, teacher_cache=a.teacher_cache, progress=not a.json)


def print_heal(r: dict) -> None:
    if r.get("local"):
        layers = r["local"]["layers"]
        mean = lambda k: sum(x[k] for x in layers) / len(layers)  # noqa: E731
        print(f"local stage: attention-output error {mean('before'):.4f} -> {mean('after'):.4f} (mean of "
              f"{len(layers)} layers) in {r['local']['seconds']}s")
    if r["steps"]:
        print(f"distilled {r['tokens']:,} tokens in {r['steps']} steps ({r['tokens_per_s']} tokens/s, "
              f"{r['seconds']}s): loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
    print(f"saved {r['out']}")


def add_heal_parser(add) -> None:
    from .healing import PRECISIONS, TRAINABLE, HealConfig

    d = HealConfig()
    h = add("heal", run_heal, "distil the source (teacher) into a converted model to recover quality")
    h.add_argument("model", help="a latentkv convert output (the student)")
    h.add_argument("--teacher", required=True, help="the source model (hub id, HF dir, .gguf, smollm2-135m)")
    h.add_argument("--data", required=True,
                   help="training text: a UTF-8 file, a folder of .txt files, or hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    h.add_argument("--out", required=True, help="output directory (written atomically)")
    h.add_argument("--tokens", type=int, help=f"training tokens (default {d.tokens:,}; 0 with --local-steps: "
                                              "local healing only)")
    h.add_argument("--seq-len", type=int, help=f"tokens per packed window (default {d.seq_len})")
    h.add_argument("--batch-size", type=int, help=f"windows per optimizer step, all processes (default {d.batch_size})")
    h.add_argument("--micro-batch", type=int, help=f"windows per forward per process (default {d.micro_batch})")
    h.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    h.add_argument("--min-lr-ratio", type=float, help=f"cosine floor as a fraction of --lr (default {d.min_lr_ratio})")
    h.add_argument("--warmup-ratio", type=float, help=f"warmup fraction of the steps (default {d.warmup_ratio})")
    h.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    h.add_argument("--max-grad-norm", type=float, help=f"gradient clipping, 0 = off (default {d.max_grad_norm})")
    h.add_argument("--temperature", type=float, help=f"distillation temperature (default {d.temperature})")
    h.add_argument("--kl-weight", type=float, help=f"weight of KL(teacher||student) (default {d.kl_weight})")
    h.add_argument("--ce-weight", type=float, help=f"weight of next-token cross-entropy (default {d.ce_weight})")
    h.add_argument("--train", choices=TRAINABLE, help="what trains: attention = the MLA weights incl. kv_a_layernorm "
                                                      "(default), all, lora (peft adapters, merged at the end)")
    h.add_argument("--lora-rank", type=int, help=f"LoRA rank with --train lora (default {d.lora_rank})")
    h.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward (less memory, ~30%% more time)")
    h.add_argument("--precision", choices=PRECISIONS, help="fp32 (default) or bf16 autocast")
    h.add_argument("--seed", type=int, help=f"data order seed (default {d.seed})")
    h.add_argument("--save-every", type=int, help=f"optimizer steps between checkpoints (default {d.save_every})")
    h.add_argument("--local-steps", type=int,
                   help="first fit each layer to the source's attention output, this many Adam steps per layer")
    h.add_argument("--local-windows", type=int, help=f"windows for the local stage (default {d.local_windows})")
    h.add_argument("--local-lr", type=float, help=f"Adam learning rate of the local stage (default {d.local_lr})")
    h.add_argument("--teacher-cache", help="folder of cached teacher top-k log-probs (filled on first use, reused)")
    h.add_argument("--teacher-topk", type=int, help=f"teacher log-probs kept per token in the cache "
                                                    f"(default {d.teacher_topk})")
    h.add_argument("--work-dir", help="checkpoints and log (default OUT.heal beside the output)")
    h.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the work dir")
    h.add_argument("--overwrite", action="store_true", help="replace --out and start the work dir over")


def run_doctor(a) -> dict:
    from .doctor import doctor

    result = doctor(a.path)
    a.exit_code = 0 if result["ok"] else 1
    return result


def print_doctor(r: dict) -> None:
    marks = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
    for c in r["checks"]:
        fix = f"  -> {c['fix']}" if c["fix"] else ""
        print(f"[{marks[c['status']]}] {c['name']}: {c['detail']}{fix}")
    print("ready" if r["ok"] else "not ready: fix the FAIL lines above")


def add_doctor_parser(add) -> None:
    d = add("doctor", run_doctor, "check the environment: torch build, accelerator, packages, memory, disk, engines")
    d.add_argument("path", nargs="?", default=".", help="where outputs will be written (disk and write checks)")
