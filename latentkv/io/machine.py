"""Facts about this machine and process that long jobs plan by and report: memory, peak RSS, heap."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from pathlib import Path

import torch


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux MemAvailable), else None."""
    try:
        return next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Bytes: the resident high-water mark since the last `reset_peak_rss` (VmHWM), 0 if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def max_rss_gib() -> float:
    """Peak resident memory of this process since it started, GiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def trim_heap() -> None:
    """Hand freed heap pages back to the OS: glibc keeps them otherwise, and a layer-by-layer job's
    resident size creeps up layer by layer from fragmentation alone (BENCHMARKS.md, "design notes")."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def native_bf16(device: str = "cpu", cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether `device` multiplies bf16 in hardware, so bf16 autocast is faster than fp32 there: a CUDA
    device that reports bf16 support, or a CPU with AVX512-BF16 or AMX-BF16 (elsewhere the CPU emulates
    bf16 and autocast is slower than fp32; BENCHMARKS.md, "heal-step")."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = next(line for line in Path(cpuinfo).read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))
