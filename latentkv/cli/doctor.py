"""`latentkv doctor`: is this environment able to convert, evaluate, heal and export?

Each check is (name, status, detail, fix): status "ok", "warn" (works, but something is missing
or slow) or "fail" (a core job cannot run). Nothing here downloads or loads a model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch
import transformers

from ..io import domains
from ..io.machine import available_memory, native_bf16
from ..loading import BUNDLED, DEFAULT_MODEL, cache_dir

GIB = 1024 ** 3
OPTIONAL = {  # package -> what needs it
    "peft": "heal --train lora",
    "datasets": "hub datasets (--data hf:..., named eval texts without the shared copies)",
    "vllm": "scripts/vllm_check.py (GPU)",
    "sglang": "serving exports with SGLang (GPU)",
    "lm_eval": "lm-evaluation-harness task scores",
}


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_torch() -> list[tuple]:
    rows = [("torch", "ok", f"{torch.__version__}, {torch.get_num_threads()} threads", "")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows.append(("accelerator", "ok", f"CUDA {torch.version.cuda}: {names}", ""))
    else:
        build = "CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build, no GPU visible"
        rows.append(("accelerator", "warn", f"none ({build})", "fine for <= 1B models; GPUs for 7B+ healing"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if native_bf16(device):
        rows.append(("bf16 matmul", "ok", f"native on {device}: heal trains under bf16 autocast (--precision auto)", ""))
    else:
        rows.append(("bf16 matmul", "warn", f"emulated on {device}: heal trains in fp32 (--precision auto)",
                     "a CPU with AVX512-BF16/AMX or a bf16 GPU heals ~1.5x faster"))
    return rows


def check_packages() -> list[tuple]:
    rows = []
    for pkg, need in (("transformers", "5.0"), ("safetensors", None), ("accelerate", None), ("gguf", None)):
        v = _version(pkg)
        ok = v is not None and (need is None or int(v.split(".")[0]) >= int(need.split(".")[0]))
        rows.append((pkg, "ok" if ok else "fail", v or "missing",
                     "" if ok else f"pip install -e . (needs {pkg}{'>=' + need if need else ''})"))
    if hasattr(transformers, "DeepseekV3Config"):
        rows.append(("deepseek_v3 in transformers", "ok", "stock loader for exports", ""))
    else:
        rows.append(("deepseek_v3 in transformers", "fail", "missing", "upgrade transformers (>= 5.0)"))
    for pkg, need in OPTIONAL.items():
        v = _version(pkg) if importlib.util.find_spec(pkg) else None
        rows.append((pkg, "ok" if v else "warn", v or "not installed", "" if v else f"only for {need}"))
    return rows


def check_memory(path: Path) -> list[tuple]:
    rows = []
    avail = available_memory()
    if avail is not None:
        status = "ok" if avail >= 4 * GIB else "warn"
        rows.append(("memory available", status, f"{avail / GIB:.1f} GiB",
                     "" if status == "ok" else "under 4 GiB: even the 135M model's calibration may swap"))
    else:
        rows.append(("memory available", "warn", "unknown (no /proc/meminfo)", ""))
    for where in (path, cache_dir()):
        target = where if where.exists() else where.parent
        if not target.exists():
            continue
        free = shutil.disk_usage(target).free
        status = "ok" if free >= 5 * GIB else ("warn" if free >= GIB else "fail")
        rows.append((f"disk free at {where}", status, f"{free / GIB:.1f} GiB",
                     "" if status == "ok" else "outputs and checkpoints are written whole; free some space"))
        if not os.access(target, os.W_OK):
            rows.append((f"write access to {where}", "fail", "read-only", "run from a writable directory"))
    return rows


def check_bundled() -> list[tuple]:
    rows = []
    for name, b in BUNDLED.items():
        there = importlib.util.find_spec(b.module) is not None
        default = name == DEFAULT_MODEL
        rows.append((f"bundled {name}", "ok" if there else "warn", "installed" if there else "not installed",
                     "" if there else f"{b.pip}" + (" (the default model of demo and tests)" if default else "")))
    return rows


def check_calibration_text() -> list[tuple]:
    """Whether the default calibration and `heal --data mix` read the documentation text the benchmarks did."""
    missing = domains.package_docs_missing()
    if not missing:
        return [("docs calibration text", "ok", f"all {len(domains.DOCS_PACKAGES)} DOCS_PACKAGES installed", "")]
    return [("docs calibration text", "warn", f"{len(missing)} of {len(domains.DOCS_PACKAGES)} DOCS_PACKAGES missing "
             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})",
             "pip install latentkv[test] to calibrate on the benchmarks' documentation text")]


def doctor(path: str | Path = ".") -> dict:
    """-> {"checks": [{"name", "status", "detail", "fix"}...], "ok": no check failed, "python"}."""
    rows = [*check_torch(), *check_packages(), *check_memory(Path(path).absolute()), *check_bundled(),
            *check_calibration_text()]
    checks = [dict(zip(("name", "status", "detail", "fix"), r)) for r in rows]
    return {"python": sys.version.split()[0], "checks": checks, "ok": all(c["status"] != "fail" for c in checks)}
