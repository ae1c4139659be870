"""The argument parser: one subcommand per library verb, flags named like the function's keywords."""

from __future__ import annotations

import argparse

from ..conversion.configs import PRESETS, RANK_ALLOCATIONS, TARGETS
from ..conversion.metrics import FACTORIZERS
from ..conversion.rope import ROPE_STRATEGIES
from ..deepseek.export import FORMATS
from ..healing.run import PRECISIONS, TRACKERS, TRAINABLE, HealConfig
from ..loading import DTYPES
from ..runtime.quant import CACHE_DTYPES
from . import commands


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentkv", description="Convert GQA/MHA models to MLA with a small latent KV cache.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, fn, help_, out: dict | None = None, overwrite: str = "replace --out if it exists"):
        """A subcommand with the common flags; `out`: the keywords of its --out (which brings --overwrite)."""
        s = sub.add_parser(name, help=help_, description=help_)
        s.set_defaults(fn=fn)
        if out is not None:
            s.add_argument("--out", **out)
            s.add_argument("--overwrite", action="store_true", help=overwrite)
        s.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
        s.add_argument("--trust-remote-code", action="store_true", help="allow hub models to run their own code")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes, only warnings, errors "
                       "and the result")
        s.add_argument("-v", "--verbose", action="store_true", help="also debug messages")
        return s

    _add_convert(add)
    _add_export(add)
    _add_verify_export(add)
    _add_load(add)
    _add_eval(add)
    _add_info(add)
    _add_sweep(add)
    _add_generate(add)
    _add_bench(add)
    _add_push(add)
    _add_localize(add)
    add_heal_parser(add)
    add_doctor_parser(add)
    ac = add("accelerate-config", commands.accelerate_config_cmd,
             "print the path of a shipped `accelerate launch` config (for --config_file), or list them")
    ac.add_argument("name", nargs="?", help="e.g. fsdp-8gpu or ddp-8gpu; none: list the shipped configs")
    _add_demo(add)
    return p


def temperature_arg(text: str) -> float | str | None:
    """--attn-temperature: auto -> None (chosen on calibration text), "off", or the factor."""
    if text in ("auto", "off"):
        return None if text == "auto" else "off"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, off or a number, got {text!r}") from None


def _dtype(p, what: str = "dtype the model is loaded and run in") -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help=f"{what}; auto: as the weights are stored (GGUF: float32)")


def _device(p) -> None:
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N")


def _cache(p) -> None:
    p.add_argument("--cache-dtype", default="model", choices=list(CACHE_DTYPES),
                   help="store a converted model's latents as: model (its dtype), fp8_e4m3 (one scale per tensor, as "
                        "vLLM's fp8 MLA cache), int8 or int4 (fp16 scale per token, or per --cache-group values), "
                        "int4_asym (fp16 scale and zero point)")
    p.add_argument("--cache-group", type=int, help="int cache dtypes: values per scale (default: one per token)")
    p.add_argument("--cache-rope", action="store_true",
                   help="store the rope key in --cache-dtype too (default: the model's dtype; vLLM's fp8 does this)")


def _add_convert(add) -> None:
    c = add("convert", commands.convert_cmd, "convert SOURCE (hub id, HF dir, .gguf, smollm2-135m) to MLA and save it to --out",
            out=dict(required=True, help="output directory (written atomically)"))
    c.add_argument("source")
    _dtype(c, "dtype of the converted checkpoint (the math runs in float32/float64)")
    c.add_argument("--kv-budget", type=float, help="fraction of the source's cache values to keep, in (0, 1]")
    c.add_argument("--kv-lora-rank", type=int, help="latent width r (with --qk-rope-head-dim)")
    c.add_argument("--qk-rope-head-dim", type=int, help="shared rotated key width (multiple of 2*num_key_value_heads)")
    c.add_argument("--kv-values", type=int, help="absolute cache values per token per layer")
    c.add_argument("--rope-slot0", type=int,
                   help="rorope-export: how many rope pairs are first components (the rest second components of "
                        "the fastest frequencies, YaRN factor < 1 in the export); default: chosen by kept energy")
    c.add_argument("--rope-skip", type=int,
                   help="rorope-export, with --rope-slot0 a: the pairs after the first a are first components of "
                        "the frequencies after this many skipped (YaRN factor > 1 in the export); default 0")
    c.add_argument("--preset", choices=list(PRESETS),
                   help="kernel-ready export-grade shape: flashmla = 512+64, flashinfer = 256+64 (implies --target "
                        "deepseek_v3; a --kv-budget given too is the cap it must fit)")
    c.add_argument("--method", choices=["exact", "svd", "lowrank"],
                   help="default: exact at full budget, lowrank (calibrated) below; svd is the weight-only baseline")
    c.add_argument("--rope", choices=list(ROPE_STRATEGIES),
                   help="lowrank: which key dims keep RoPE (default rorope; -fold2/-fold4 fold neighbouring "
                        "frequencies, not exportable; elite: EliteKV's per-head greedy choice by attention-output "
                        "error on calibration windows)")
    c.add_argument("--factorizer", choices=list(FACTORIZERS), help="lowrank: latent factorizer (default output)")
    c.add_argument("--attn-moment", type=float,
                   help="lowrank: weight in [0, 1] of the attention-averaged input moment in the calibration "
                        "statistics (default 0.3; 0: token moment only)")
    c.add_argument("--rank-allocation", choices=list(RANK_ALLOCATIONS),
                   help="lowrank: per-layer latent ranks from each layer's spectrum and measured held-out "
                        "NLL cost, kept only if held-out NLL improves (native format only; default uniform)")
    c.add_argument("--sequential", action="store_true",
                   help="lowrank: statistics from the converted prefix, refit to the source's outputs (default one-shot)")
    c.add_argument("--calib", help="lowrank: calibration text file or name (default wikitext2-valid)")
    c.add_argument("--calib-samples", type=int, help="lowrank: calibration windows (default 32)")
    c.add_argument("--calib-seq-len", type=int, help="lowrank: tokens per calibration window (default 512)")
    c.add_argument("--rope-horizon", type=int,
                   help="lowrank: query-key distances over which a pair that loses RoPE is averaged (default 512)")
    c.add_argument("--kv-separate", action="store_true",
                   help="lowrank: separate key and value latents (DiffQKV-style; an ablation: the joint latent is "
                        "the least-squares optimum), their widths split by the two spectra")
    c.add_argument("--attn-temperature", type=temperature_arg,
                   help="lowrank: one factor on every attention logit, folded into the queries: auto (default) "
                        "chooses it on calibration text at --temperature-seq-len tokens after fitting two factors per head to "
                        "the source's attention; a number: that factor after the per-head fit; off: neither")
    c.add_argument("--temperature-seq-len", type=int,
                   help="lowrank: tokens per window the temperature is chosen on: the context you serve (default 2048)")
    c.add_argument("--output-refit", choices=("on", "off"),
                   help="lowrank: refit every o_proj by least squares to the source's attention output, on "
                        "calibration windows walked through both models (default off: on SmolLM2 it lowered perplexity "
                        "at 50 %% but lost copying and passkeys, and wrecked 25 %%)")
    c.add_argument("--refit-windows", type=int,
                   help="lowrank: calibration windows of --temperature-seq-len tokens the output refit reads (default 16)")
    c.add_argument("--latent-norm", action="store_true",
                   help="lowrank: fit the latent RMSNorm (kv_a_layernorm) stock DeepSeek-V3 engines apply")
    c.add_argument("--target", choices=[*TARGETS, "gqa"],
                   help="deepseek_v3: make every choice the export to it can express (rope rorope-export, latent norm, "
                        "uniform ranks, no latent bias); gqa: no MLA, merge the KV heads into --kv-heads and write the "
                        "source's own architecture")
    c.add_argument("--kv-heads", type=int, help="--target gqa: KV heads of the result (must divide the source's)")
    c.add_argument("--stream", action="store_true", help="convert a local sharded safetensors checkpoint layer by "
                   "layer in bounded memory (resumes if interrupted)")
    c.add_argument("--device", default="cpu", help="--stream: where the layers' calibration passes run (cpu, cuda)")


def _add_export(add) -> None:
    x = add("export", commands.export_cmd, "write a converted DIR as a stock DeepSeek-V3 checkpoint (transformers, vLLM, SGLang)",
            out=dict(required=True, help="output directory (written atomically)"))
    x.add_argument("model", help="a latentkv convert output")
    _dtype(x, "dtype of the exported weights")
    x.add_argument("--format", default="deepseek_v3", choices=list(FORMATS))
    x.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")


def _add_verify_export(add) -> None:
    v = add("verify-export", commands.verify_export_cmd, "load an export with stock transformers and compare it with our runtime")
    v.add_argument("out", help="a `latentkv export` output")
    v.add_argument("--against", required=True, help="the latentkv convert output it was exported from")
    v.add_argument("--text", help="sample text file or name (default: a built-in paragraph)")
    v.add_argument("--tokens", type=int, default=128, help="sample tokens compared")
    v.add_argument("--atol", type=float, default=1e-3, help="largest logit difference that passes (fp32; bf16 "
                   "needs ~0.5)")
    v.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype both sides run in")
    v.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                   help="vllm: serve OUT with stock vLLM on a GPU and compare greedy tokens (skips without one)")
    v.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="--engine vllm: vLLM's cache dtype; fp8 is compared with our emulation of it")


def _add_load(add) -> None:
    lo = add("load", commands.load_cmd, "read a DeepSeek-V3 checkpoint (an export or anyone's) into the latentkv runtime",
             out=dict(help="also save it in latentkv's native format here"))
    lo.add_argument("model")
    _dtype(lo)


def _add_eval(add) -> None:
    e = add("eval", commands.eval_cmd, "perplexity and/or passkey retrieval of MODEL_OR_DIR")
    e.add_argument("model")
    _dtype(e)
    _cache(e)
    _device(e)
    e.add_argument("--ppl", help="perplexity on a UTF-8 text file, or wikitext2 / wikitext2-valid / ptb / "
                   "wikitext2-heldout (the tail of valid that no calibration or healing reads: choose settings on it)")
    e.add_argument("--seq-len", type=int, default=2048, help="window length in tokens")
    e.add_argument("--stride", type=int, help="slide windows by this many tokens (default: non-overlapping)")
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    e.add_argument("--passkey", action="store_true", help="synthetic passkey retrieval accuracy")
    e.add_argument("--context", default="1024,2048,4096", help="passkey prompt lengths in tokens")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey needle depths in [0, 1]")
    e.add_argument("--trials", type=int, default=3, help="passkey trials per context and depth")
    e.add_argument("--copy", action="store_true", help="in-context copy probe: accuracy and NLL on the second copy "
                   "of repeated random token sequences")
    e.add_argument("--copy-lengths", default="64,256,1024", help="copy probe sequence lengths in tokens")
    e.add_argument("--copy-distances", default="0,512", help="copy probe gaps between the two copies, in tokens")
    e.add_argument("--suite", action="store_true", help="the dev suite: perplexity on every domain's held-out "
                   "text (WikiText-2, PTB, fiction, code, docs; --max-windows per domain, default 8) and the copy probe")
    e.add_argument("--tasks", help="zero-shot lm-eval-harness tasks, comma-separated: hub names (hellaswag, arc_easy, "
                   "piqa, ...; need the hub) or the local latentkv_lastword_ptb, latentkv_cloze_fiction")
    e.add_argument("--limit", type=int, help="--tasks: score only the first N documents of each task")


def _add_info(add) -> None:
    i = add("info", commands.info_cmd, "architecture and cache values/bytes per token of a model vs its source")
    i.add_argument("model")
    _dtype(i)


def _add_sweep(add) -> None:
    w = add("sweep", commands.sweep_cmd, "convert SOURCE with every method at every budget and evaluate each the same way",
            out=dict(required=True, help="directory for sweep.json, sweep.md and ppl_vs_cache.png"))
    w.add_argument("source")
    w.add_argument("--budgets", default="1,0.5,0.25,0.125", help="comma-separated KV budgets in (0, 1]")
    w.add_argument("--methods", default="lowrank,svd", help="comma-separated methods: lowrank, svd")
    w.add_argument("--ppl", default="wikitext2", help="evaluation text (file or wikitext2 / ptb)")
    w.add_argument("--seq-len", type=int, default=2048)
    w.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    w.add_argument("--passkey", help="also passkey accuracy at these contexts, e.g. 1024,2048")
    _dtype(w, "dtype every row is evaluated in (conversions compute in float32); auto: as SOURCE is stored")


def _add_generate(add) -> None:
    g = add("generate", commands.generate_cmd, "generate text with MODEL_OR_DIR (absorbed latent decode for converted models)")
    g.add_argument("model")
    g.add_argument("prompt", nargs="?", help="the prompt (or --batch-file)")
    g.add_argument("--batch-file", help="text file, one prompt per line, generated as one left-padded batch")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    _dtype(g)
    _cache(g)
    _device(g)


def _add_bench(add) -> None:
    b = add("bench", commands.bench_cmd, "prefill time, decode tokens/s, memory and cache bytes: source vs converted",
            out=dict(default="bench-out", help="directory for bench.json and bench.png (written atomically)"))
    b.add_argument("model")
    b.add_argument("--against", help="the source model to compare with")
    b.add_argument("--context", default="1024,4096,8192,16384", help="context lengths in tokens")
    b.add_argument("--batch", default="1,4,16", help="batch sizes")
    b.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per row")
    b.add_argument("--compile", action="store_true", help="also time the source and absorbed decode steps through "
                   "torch.compile (rows `...-compiled`; each compiles twice before it is timed)")
    _dtype(b, "dtype both models are loaded and run in")
    _cache(b)
    _device(b)


def _add_push(add) -> None:
    u = add("push", commands.push_cmd, "upload a directory (an export) to the Hugging Face Hub as a model repo")
    u.add_argument("folder", help="e.g. a `latentkv export` output (its README.md is the model card)")
    u.add_argument("--repo-id", required=True, help="OWNER/NAME")
    u.add_argument("--private", action="store_true")
    u.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")


def _add_localize(add) -> None:
    lo = add("localize", commands.localize_cmd, "make layers of a converted model local (sinks + window, "
             "DuoAttention-style): their cache stops growing; the rest keep every token",
             out=dict(required=True, help="where the model with local layers is saved"))
    lo.add_argument("model", help="a latentkv convert output")
    lo.add_argument("--count", type=int, help="how many layers go local, the least retrieval-bearing first "
                    "(a passkey probe decides)")
    lo.add_argument("--layers", help="or exactly these layers, e.g. 0,1,2")
    lo.add_argument("--sinks", type=int, default=4, help="first tokens every local layer keeps (default 4)")
    lo.add_argument("--window", type=int, default=256, help="recent tokens a local layer sees (default 256)")
    lo.add_argument("--probe-context", type=int, default=2048, help="the probe's prompt length (default 2048)")
    _dtype(lo)


def _add_demo(add) -> None:
    d = add("demo", commands.demo_cmd, "the main job: convert the bundled SmolLM2, compare cache size and perplexity",
            out=dict(help="also save the compressed model here"))
    d.add_argument("--kv-budget", type=float, default=0.5, help="budget of the compressed variant")
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--max-windows", type=int, default=4)
    d.add_argument("--text", default="wikitext2", help="evaluation text (file or dataset name)")
    _dtype(d, "dtype every variant is evaluated in and the saved one written in (conversions compute in float32)")


def add_heal_parser(add) -> None:
    d = HealConfig()
    h = add("heal", commands.heal_cmd, "distil the source (teacher) into a converted model to recover quality",
            out=dict(required=True, help="output directory (written atomically)"),
            overwrite="replace --out and start the work dir over")
    h.add_argument("model", help="a latentkv convert output (the student)")
    h.add_argument("--teacher", required=True, help="the source model (hub id, HF dir, .gguf, smollm2-135m)")
    h.add_argument("--data", required=True,
                   help="training text: a UTF-8 file, a folder of .txt files, mix (every domain's calibration "
                        "part: prose, fiction, code, docs) or hf:NAME[:CONFIG]:SPLIT[:COLUMN]")
    h.add_argument("--tokens", type=int, help=f"training tokens (default {d.tokens:,}; 0 with --local-steps: "
                                              "local healing only)")
    h.add_argument("--seq-len", type=int, help=f"tokens per packed window (default {d.seq_len})")
    _heal_optimizer_args(h.add_argument_group("optimizer"), d)
    _heal_loss_args(h.add_argument_group("loss"), d)
    _heal_window_args(h.add_argument_group("windows"), d)
    _heal_run_args(h.add_argument_group("local stage, teacher cache and bookkeeping"), d)
    _dtype(h, "dtype of the healed checkpoint (training keeps float32 weights); auto: as MODEL is stored")


def _heal_optimizer_args(h, d: HealConfig) -> None:
    h.add_argument("--batch-size", type=int, help=f"windows per optimizer step, all processes (default {d.batch_size})")
    h.add_argument("--micro-batch", type=int, help=f"windows per forward per process (default {d.micro_batch})")
    h.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    h.add_argument("--min-lr-ratio", type=float, help=f"cosine floor as a fraction of --lr (default {d.min_lr_ratio})")
    h.add_argument("--warmup-ratio", type=float, help=f"warmup fraction of the steps (default {d.warmup_ratio})")
    h.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    h.add_argument("--max-grad-norm", type=float, help=f"gradient clipping, 0 = off (default {d.max_grad_norm})")
    h.add_argument("--train", choices=TRAINABLE, help="what trains: attention = the MLA weights incl. kv_a_layernorm "
                                                      "(default), all, lora (peft adapters, merged at the end)")
    h.add_argument("--rest-lr-ratio", type=float, help="with --train all: learning rate of the weights outside "
                   f"attention (MLPs, norms, embeddings) as a fraction of --lr (default {d.rest_lr_ratio})")
    h.add_argument("--lora-rank", type=int, help=f"LoRA rank with --train lora (default {d.lora_rank})")
    h.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward (less memory, ~30%% more time)")
    h.add_argument("--precision", choices=PRECISIONS, help="auto (default): bf16 autocast where the hardware "
                                                          "multiplies bf16 (GPUs, AVX512-BF16/AMX CPUs), else fp32")
    h.add_argument("--average-last", type=float, help="save the mean of the weights over this fraction of the last "
                   f"optimizer steps (tail averaging; e.g. 0.2; default {d.average_last} = the last step's weights)")


def _heal_loss_args(h, d: HealConfig) -> None:
    h.add_argument("--temperature", type=float, help=f"distillation temperature (default {d.temperature})")
    h.add_argument("--kl-weight", type=float, help=f"weight of KL(teacher||student) (default {d.kl_weight})")
    h.add_argument("--ce-weight", type=float, help=f"weight of next-token cross-entropy (default {d.ce_weight})")
    h.add_argument("--hidden-weight", type=float, help="weight of every layer's hidden-state error to the teacher's "
                   f"(relative per token; live teacher only, not with --teacher-cache; default {d.hidden_weight})")


def _heal_window_args(h, d: HealConfig) -> None:
    h.add_argument("--long-seq-len", type=int, help="with --long-every N: every N-th step trains on windows this "
                   "long instead (a step's tokens, or one window if longer; live teacher), for long-range recall "
                   "(passkey)")
    h.add_argument("--long-every", type=int, help="how often a step of --long-seq-len windows comes (e.g. 4)")
    h.add_argument("--copy-share", type=float, help="fraction of the windows that get a copy drill: a random-token "
                   "span planted twice, natural text around it, for in-context copying (e.g. 0.1; default "
                   f"{d.copy_share})")
    h.add_argument("--long-copy-share", type=float, help="with --long-seq-len: fraction of the long windows that get "
                   "a long-range copy drill (8-32 random ids planted twice, a quarter window or more apart), for "
                   f"recall across the whole context (passkey; e.g. 0.75; default {d.long_copy_share})")
    h.add_argument("--seed", type=int, help=f"data order seed (default {d.seed})")


def _heal_run_args(h, d: HealConfig) -> None:
    h.add_argument("--local-steps", type=int,
                   help="first fit each layer to the source's attention output, this many Adam steps per layer")
    h.add_argument("--local-windows", type=int, help=f"windows for the local stage (default {d.local_windows})")
    h.add_argument("--local-lr", type=float, help=f"Adam learning rate of the local stage (default {d.local_lr})")
    h.add_argument("--teacher-cache", help="folder of cached teacher top-k log-probs (filled on first use, reused)")
    h.add_argument("--teacher-topk", type=int, help=f"teacher log-probs kept per token in the cache "
                                                    f"(default {d.teacher_topk})")
    h.add_argument("--save-every", type=int, help=f"optimizer steps between checkpoints (default {d.save_every})")
    h.add_argument("--work-dir", help="checkpoints and log (default OUT.heal beside the output)")
    h.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the work dir")
    h.add_argument("--report-to", default="none", choices=TRACKERS,
                   help="also log every step to this tracker (accelerate's; written to OUT/trackers or wandb); "
                        "log.jsonl and the loss plot are always written")


def add_doctor_parser(add) -> None:
    d = add("doctor", commands.doctor_cmd, "check the environment: torch build, accelerator, packages, memory, disk, engines")
    d.add_argument("path", nargs="?", default=".", help="where outputs will be written (disk and write checks)")
