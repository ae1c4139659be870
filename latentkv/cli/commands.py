"""One function per subcommand: parsed arguments in, a result dict out (printed by `printers`).

Each only wires library calls; `a.progress` is False under --quiet (progress goes to stderr, so
--json keeps stdout to the one JSON object either way).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from importlib.resources import files
from pathlib import Path

import torch

from ..conversion.configs import make_config
from ..conversion.dispatch import convert
from ..conversion.gqa import to_gqa
from ..conversion.streaming import check_fits_in_memory, convert_streaming
from ..deepseek.export import export, exportable_dims
from ..deepseek.layout import kernel_warning
from ..deepseek.reader import require_engine_checkpoint
from ..errors import LatentKVError
from ..evaluation.copy import copy_probe
from ..evaluation.passkey import passkey
from ..evaluation.perplexity import perplexity
from ..evaluation.suite import SUITE_WINDOWS, dev_suite
from ..healing.run import HealConfig, heal
from ..io.atomic import atomic_output_dir, check_output_dir
from ..io.hub import local_snapshot, push
from ..io.text import load_text
from ..loading import load_model, parse_dtype, stored_dtype
from ..record import record_of, record_summary
from ..reports.bench import bench, write_bench
from ..reports.duo import localize
from ..reports.engine import verify_with_vllm
from ..reports.harness import run_tasks, task_manager
from ..reports.sweep import run_sweep, write_sweep
from ..reports.verify import verify_export
from ..runtime.accounting import cache_report
from ..runtime.cache import LatentCache
from ..runtime.checkpoint import save
from ..runtime.generation import generate, greedy_continuation
from ..runtime.local import LocalSpan
from ..runtime.quant import CacheFormat
from .demo import run_demo
from .doctor import doctor


def temperature_flags(value) -> dict:
    """--attn-temperature auto (None) | off | a factor -> the config's two temperature fields."""
    return {"attn_temperature": 1.0, "head_temperatures": False} if value == "off" else {"attn_temperature": value}


def convert_config(a):
    """The conversion config that `convert`'s flags ask for."""
    return make_config(a.kv_budget, a.kv_lora_rank, a.qk_rope_head_dim, a.method, a.kv_values, rope=a.rope,
                       factorizer=a.factorizer, sequential=True if a.sequential else None, calib=a.calib,
                       calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len,
                       rank_allocation=a.rank_allocation, attn_moment=a.attn_moment,
                       latent_norm=True if a.latent_norm else None, target=a.target, rope_horizon=a.rope_horizon,
                       preset=a.preset, rope_slot0=a.rope_slot0, rope_skip=a.rope_skip,
                       kv_separate=True if a.kv_separate else None, temperature_seq_len=a.temperature_seq_len,
                       output_refit=None if a.output_refit is None else a.output_refit == "on",
                       refit_windows=a.refit_windows, **temperature_flags(a.attn_temperature))


def convert_cmd(a) -> dict:
    if a.target == "gqa" or a.kv_heads is not None:
        return gqa_cmd(a)
    config = convert_config(a)
    check_output_dir(a.out, a.overwrite, inputs=(a.source, a.calib))
    t0 = time.perf_counter()
    if a.stream:
        if a.dtype != "auto":
            raise LatentKVError("--stream writes the source's stored dtype (--dtype auto); convert in memory for another")
        record = convert_streaming(local_snapshot(a.source), config, a.out, overwrite=a.overwrite, device=a.device, progress=a.progress)
        return {"out": a.out, "method": config.method, **record_summary(record),
                "streaming": {k: v for k, v in record["streaming"].items() if k != "layers"},
                "total_seconds": round(time.perf_counter() - t0, 2)}
    check_fits_in_memory(a.source)
    model, tok = load_model(a.source, trust_remote_code=a.trust_remote_code, progress=a.progress)
    converted = convert(model, config, tokenizer=tok, progress=a.progress)
    converted.to(output_dtype(a))  # the math ran in float32/float64; the checkpoint keeps the source's dtype
    if a.target:
        warning = kernel_warning(exportable_dims(converted))
        if warning:
            warnings.warn(warning, stacklevel=1)
    save(converted, tok, a.out, overwrite=a.overwrite)
    return {"out": a.out, "method": config.method, **record_summary(record_of(converted)),
            "total_seconds": round(time.perf_counter() - t0, 2)}


def output_dtype(a):
    """The dtype `convert` writes: --dtype, or (auto) the one the source is stored in."""
    return stored_dtype(a.source, a.trust_remote_code) if a.dtype == "auto" else parse_dtype(a.dtype)


def gqa_cmd(a) -> dict:
    """convert --target gqa --kv-heads K: the source with fewer KV heads, as a stock checkpoint."""
    if a.target != "gqa" or a.kv_heads is None:
        raise LatentKVError("--kv-heads goes with --target gqa (and --target gqa needs --kv-heads K)")
    if a.stream or a.kv_budget is not None or a.kv_lora_rank is not None or a.preset or a.method:
        raise LatentKVError("--target gqa takes --kv-heads (and --calib options) only; budgets, ranks, presets, "
                            "methods and --stream belong to MLA conversions")
    check_output_dir(a.out, a.overwrite, inputs=(a.source, a.calib))
    t0 = time.perf_counter()
    model, tok = load_model(a.source, trust_remote_code=a.trust_remote_code, progress=a.progress)
    calib = make_config(kv_budget=0.5, calib=a.calib, calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len)
    merged = to_gqa(model, a.kv_heads, tokenizer=tok, calib=calib, progress=a.progress)
    merged.to(output_dtype(a))
    with atomic_output_dir(a.out, a.overwrite) as tmp:
        merged.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    source_heads = model.config.num_key_value_heads
    return {"out": a.out, "target": "gqa", "kv_heads": a.kv_heads, "source_kv_heads": source_heads,
            "ratio": a.kv_heads / source_heads, "architecture": type(merged).__name__,
            "total_seconds": round(time.perf_counter() - t0, 2)}


def eval_cmd(a) -> dict:
    if not (a.ppl or a.passkey or a.copy or a.suite or a.tasks):
        raise LatentKVError("eval needs --ppl FILE, --passkey, --copy, --suite and/or --tasks")
    fmt = cache_format(a)
    if fmt.quantized and (a.passkey or a.copy or a.suite or a.tasks or not a.ppl):
        raise LatentKVError("--cache-dtype applies to --ppl (and to generate and bench); run --passkey, --copy, "
                            "--suite and --tasks without it")
    text = load_text(a.ppl) if a.ppl else None
    tasks = a.tasks.split(",") if a.tasks else None
    manager = task_manager(tasks) if tasks else None  # an unknown task is one line before any loading
    model, tok = _with_tokenizer(a.model, a)
    out = {"model": a.model, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
           "cache_dtype": fmt.name}
    if text is not None:
        factory = (lambda: LatentCache(model, cache_dtype=fmt)) if fmt.quantized else None
        if factory is not None:
            factory()  # a source model is refused here, before any window runs
        result = perplexity(model, tok, text, seq_len=a.seq_len, stride=a.stride, max_windows=a.max_windows,
                            progress=a.progress, cache_factory=factory)
        out.update(text=a.ppl, **result.to_dict())
    if a.passkey:
        out["passkey"] = passkey(model, tok, contexts=numbers(a.context, int), depths=numbers(a.depths, float),
                                 trials=a.trials, progress=a.progress,
                                 continuation=lambda ids, n: greedy_continuation(model, ids, n))
    if a.copy:
        out["copy"] = copy_probe(model, numbers(a.copy_lengths, int), numbers(a.copy_distances, int),
                                 progress=a.progress)
    if a.suite:
        out["suite"] = dev_suite(model, tok, seq_len=a.seq_len, max_windows=a.max_windows or SUITE_WINDOWS,
                                 progress=a.progress)
    if a.tasks:
        out["tasks"] = run_tasks(model, tok, tasks, limit=a.limit, max_length=a.seq_len, manager=manager)
    return out


def cache_format(a) -> CacheFormat:
    return CacheFormat(a.cache_dtype, a.cache_group, a.cache_rope)


def on_device(model, device: str):
    """`model` moved to --device, or one line saying why it cannot go there."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LatentKVError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LatentKVError(f"--device {device}: no CUDA GPU is visible here (torch.cuda.is_available() is False)")
    return model.to(dev)


def _with_tokenizer(name: str, a):
    model, tok = load_model(name, dtype=a.dtype, trust_remote_code=a.trust_remote_code, progress=a.progress)
    model = on_device(model, getattr(a, "device", "cpu"))
    if tok is None:
        raise LatentKVError(f"{name} has no tokenizer files; re-run `latentkv convert` from a source with one")
    return model, tok


def numbers(csv: str, kind):
    try:
        return tuple(kind(v) for v in csv.split(","))
    except ValueError:
        raise LatentKVError(f"expected comma-separated numbers, got {csv!r}") from None


def info_cmd(a) -> dict:
    return cache_report(load_model(a.model, dtype=a.dtype, trust_remote_code=a.trust_remote_code, progress=a.progress)[0])


def demo_cmd(a) -> dict:
    return run_demo(kv_budget=a.kv_budget, out=a.out, overwrite=a.overwrite, seq_len=a.seq_len,
                    max_windows=a.max_windows, text=a.text, progress=a.progress, dtype=parse_dtype(a.dtype))


def sweep_cmd(a) -> dict:
    check_output_dir(a.out, a.overwrite, inputs=(a.source, a.ppl))
    dtype = output_dtype(a)  # before loading: a bad --dtype or source is one line
    model, tok = load_model(a.source, trust_remote_code=a.trust_remote_code, progress=a.progress)
    result = run_sweep(model, tok, numbers(a.budgets, float), a.methods.split(","), a.ppl, seq_len=a.seq_len,
                       max_windows=a.max_windows, passkey_contexts=numbers(a.passkey, int) if a.passkey else (),
                       progress=a.progress, dtype=dtype)
    write_sweep(result, a.out, a.command, overwrite=a.overwrite)
    return {**result, "out": a.out}


def generate_cmd(a) -> dict:
    prompts = [a.prompt] if a.prompt is not None else []
    if a.batch_file:
        path = Path(a.batch_file)
        if not path.is_file():
            raise LatentKVError(f"batch file {path} not found; give a text file with one prompt per line")
        try:
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise LatentKVError(f"batch file {path} is not UTF-8 text; give a text file with one prompt per line") from None
        if not prompts:
            raise LatentKVError(f"batch file {path} has no prompts; put one prompt per line")
    if not prompts:
        raise LatentKVError('give a prompt (latentkv generate MODEL "text") or --batch-file FILE')
    model, tok = _with_tokenizer(a.model, a)
    live = not a.json and len(prompts) == 1
    stream = (lambda i, text: print(text, end="", flush=True)) if live else None
    out = generate(model, tok, prompts, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                   stop=tuple(a.stop or ()), seed=a.seed, stream=stream, cache_dtype=cache_format(a))
    if live:
        print()
    return {"prompts": prompts, **out.to_dict(), "streamed": live}


def bench_cmd(a) -> dict:
    contexts, batches = numbers(a.context, int), numbers(a.batch, int)
    check_output_dir(a.out, a.overwrite, inputs=(a.model, a.against))
    fmt = cache_format(a)
    model, _ = load_model(a.model, dtype=a.dtype, trust_remote_code=a.trust_remote_code, progress=a.progress)
    model = on_device(model, a.device)
    if fmt.quantized and record_of(model) is None:
        raise LatentKVError("--cache-dtype quantizes a latentkv latent cache and MODEL is a source model; bench a "
                            "conversion (with --against SOURCE for the comparison)")
    against = (on_device(load_model(a.against, dtype=a.dtype, trust_remote_code=a.trust_remote_code,
                                    progress=a.progress)[0], a.device) if a.against else None)
    result = bench(model, against, contexts, batches, a.new_tokens, progress=a.progress, cache_dtype=fmt,
                   compile=a.compile)
    write_bench(result, a.out, overwrite=a.overwrite)
    return {**result, "out": a.out}


def export_cmd(a) -> dict:
    check_output_dir(a.out, a.overwrite, inputs=(a.model,))
    model, tok = load_model(a.model, dtype=a.dtype, progress=a.progress)
    export(model, a.out, tokenizer=tok, fmt=a.format, overwrite=a.overwrite, max_shard_size=a.max_shard_size)
    return {"out": a.out, "format": a.format}


def verify_export_cmd(a) -> dict:
    if a.engine == "vllm":
        result = verify_with_vllm(a.out, a.against, dtype=a.dtype if a.dtype != "float32" else "bfloat16",
                                  kv_cache_dtype=a.kv_cache_dtype)
        a.exit_code = 0 if result["passed"] else 1
        return result
    text = load_text(a.text) if a.text else None
    result = verify_export(a.out, a.against, text=text, tokens=a.tokens, atol=a.atol, progress=a.progress,
                           dtype=parse_dtype(a.dtype))
    if not result["passed"]:
        a.exit_code = 1
    return result


def load_cmd(a) -> dict:
    require_engine_checkpoint(a.model)
    if a.out:
        check_output_dir(a.out, a.overwrite, inputs=(a.model,))
    model, tok = load_model(a.model, dtype=a.dtype, progress=a.progress)
    if a.out:
        save(model, tok, a.out, overwrite=a.overwrite)
    return {**cache_report(model), "out": a.out}


def heal_cmd(a) -> dict:
    a.silent = int(os.environ.get("RANK", "0")) != 0  # under torchrun/accelerate only rank 0 prints
    fields = {f.name for f in dataclasses.fields(HealConfig)}
    config = HealConfig(**{k: v for k, v in vars(a).items() if k in fields and v is not None})
    return heal(a.model, a.teacher, a.data, a.out, config, overwrite=a.overwrite, resume=a.resume,
                work_dir=a.work_dir, teacher_cache=a.teacher_cache, progress=a.progress and not a.json,
                dtype=parse_dtype(a.dtype), report_to=a.report_to)


def localize_cmd(a) -> dict:
    check_output_dir(a.out, a.overwrite, inputs=(a.model,))
    model, tok = load_model(a.model, dtype=a.dtype, progress=a.progress)
    layers = None if a.layers is None else numbers(a.layers, int)
    result = localize(model, tok, count=a.count, layers=layers, span=LocalSpan(a.sinks, a.window),
                      probe_context=a.probe_context, progress=a.progress)
    save(model, tok, a.out, overwrite=a.overwrite)
    return {**result, "out": a.out}


def push_cmd(a) -> dict:
    return push(a.folder, a.repo_id, private=a.private, dry_run=a.dry_run)


def doctor_cmd(a) -> dict:
    result = doctor(a.path)
    a.exit_code = 0 if result["ok"] else 1
    return result


ACCELERATE_CONFIGS = files("latentkv") / "data" / "accelerate"


def accelerate_config_cmd(a) -> dict:
    """The path of a shipped `accelerate launch` config (for --config_file), or the list of them."""
    names = sorted(p.name.removesuffix(".yaml") for p in ACCELERATE_CONFIGS.iterdir() if p.name.endswith(".yaml"))
    if a.name is None:
        return {"configs": names}
    if a.name not in names:
        raise LatentKVError(f"no accelerate config {a.name!r}; shipped: {', '.join(names)}")
    return {"name": a.name, "path": str(ACCELERATE_CONFIGS / f"{a.name}.yaml")}
