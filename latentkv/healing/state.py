"""Healing's durable state: atomic checkpoints, resume, the JSONL log and the loss plot.

Work folder (default: OUT + ".heal", beside the output):
  run.json            what this run is (config, data fingerprint, student, teacher): resume checks it
  ckpt-00000050/      accelerate `save_state` (model, optimizer, RNG per process, scheduler) +
                      progress.json; written as .ckpt-tmp/ and renamed, so it exists whole or not at all
  local.safetensors   the attention weights after the local (layer-wise) stage, if any
  log.jsonl           one line per optimizer step
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import LatentKVError
from ..io.atomic import write_file_atomic
from ..io.plots import figure

PREFIX, TMP = "ckpt-", ".ckpt-tmp"


def latest_checkpoint(work: Path) -> Path | None:
    done = sorted(p for p in work.glob(f"{PREFIX}*") if (p / "progress.json").is_file())
    return done[-1] if done else None


def prepare_work_dir(work: Path, run: dict, resume: bool, overwrite: bool, defaults: dict | None = None) -> Path | None:
    """-> the checkpoint to resume from (or None). Refuses to mix runs or to drop work silently.
    defaults: the config's default values; a setting the work dir's record lacks (it was started by a version
    without it) counts as its default, so a run survives an upgrade that only adds options.
    Main process only: it may start the folder over."""
    meta = work / "run.json"
    ckpt = latest_checkpoint(work) if work.is_dir() else None
    if meta.is_file() and not resume and not overwrite:
        at = f" (checkpoint at step {read_progress(ckpt)['step']})" if ckpt else ""
        raise LatentKVError(f"{work} holds an earlier healing run{at}; pass --resume to continue it "
                            "or --overwrite to start over")
    if resume and meta.is_file():
        old = json.loads(meta.read_text())
        if defaults and isinstance(old.get("config"), dict):
            old["config"] = {**defaults, **old["config"]}
        diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
        if diff:
            raise LatentKVError(f"--resume: {work} was started with other settings ({', '.join(diff)} differ); "
                                "rerun with the same arguments or pass --overwrite to start over")
        return ckpt
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_file_atomic(meta, json.dumps(run, indent=2, default=str))
    return None


def read_progress(ckpt: Path) -> dict:
    return json.loads((ckpt / "progress.json").read_text())


def save_checkpoint(acc, work: Path, progress: dict, keep: int = 1, extra=None) -> Path:
    """Every process writes its part into .ckpt-tmp/ (accelerate's state, then `extra(folder)` if given), then
    the main one renames it into place.
    On any failure (disk full, permission) the temp dir is dropped and the previous checkpoint
    stays the latest, untouched."""
    tmp = work / TMP
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    acc.wait_for_everyone()
    error = None
    try:
        acc.save_state(str(tmp), safe_serialization=True)
        if extra is not None:
            extra(tmp)
        if acc.is_main_process:
            write_file_atomic(tmp / "progress.json", json.dumps(progress))
    except OSError as e:
        error = e
    failed = acc.reduce(torch.tensor([float(error is not None)], device=acc.device), "sum").item()
    final = work / f"{PREFIX}{progress['step']:08d}"
    if failed:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(work)
        kept = f"the previous checkpoint ({prev.name}) is intact" if prev else "no earlier checkpoint exists"
        why = os.strerror(error.errno) if error is not None and error.errno else "another process failed"
        raise LatentKVError(f"could not write checkpoint {final} ({why}); {kept}; free disk space or fix "
                            "permissions, then rerun with --resume")
    if acc.is_main_process:
        os.rename(tmp, final)
        _fsync_dir(work)
        for old in sorted(p for p in work.glob(f"{PREFIX}*") if p != final)[:-keep or None]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_log(path: Path) -> list[dict]:
    """The rows of a step log (JSONL); [] when there is none yet."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StepLog:
    """Append-only JSONL, one record per optimizer step; on resume, lines past the checkpoint go."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.is_file():
            rows = read_log(path)
            write_file_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_step))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return read_log(self.path)


def plot_losses(rows: list[dict], out: Path, title: str) -> Path | None:
    """Loss (and its parts) against training tokens -> PNG; None without rows."""
    if not rows:
        return None
    with figure(out) as (_, ax):
        tokens = [r["tokens"] for r in rows]
        for key in ("loss", "kl", "ce"):  # a part is drawn only when it is not the whole loss or zero
            vals = [r.get(key) or 0.0 for r in rows]
            if key == "loss" or (any(vals) and vals != [r["loss"] for r in rows]):
                ax.plot(tokens, [r.get(key) for r in rows], label=key, lw=1)
        ax.set(xlabel="training tokens", ylabel="loss", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    return out
