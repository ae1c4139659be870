"""Distillation losses and the on-disk teacher cache.

KL(teacher || student) on temperature-softened next-token distributions, scaled by T^2 (Hinton)
so the gradient size does not depend on T. A cached teacher keeps only its top-k log-probs per
token; the loss then compares the two distributions coarsened to k + 1 bins (the teacher's
top-k tokens and "everything else"), an exact KL of those coarsened distributions and a lower
bound of the full one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from ..errors import LatentKVError
from ..io.atomic import write_file_atomic


def kl_full(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """student, teacher logits (B, T, V) -> mean over tokens of T^2 KL(p_t || p_s), scalar."""
    s = F.log_softmax(student.float() / temperature, -1)
    t = F.log_softmax(teacher.float() / temperature, -1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean") * temperature ** 2


def teacher_topk(teacher: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """teacher logits (B, T, V) -> top-k log-probs (B, T, k) float32 and their token ids (B, T, k) int32."""
    logp = F.log_softmax(teacher.float() / temperature, -1)
    vals, idx = logp.topk(k, -1)
    return vals, idx.to(torch.int32)


def kl_topk(student: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor, temperature: float = 1.0):
    """student logits (B, T, V), cached teacher top-k (B, T, k) -> mean T^2 KL over k + 1 bins."""
    s = F.log_softmax(student.float() / temperature, -1).gather(-1, t_idx.long())  # (B, T, k)
    p = t_logp.exp()
    p_tail = (1 - p.sum(-1)).clamp(min=0)
    log_tail_s = torch.log1p(-s.exp().sum(-1).clamp(max=1 - 1e-6))
    log_tail_t = torch.log(p_tail.clamp(min=1e-30))
    kl = (p * (t_logp - s)).sum(-1) + p_tail * (log_tail_t - log_tail_s)
    return kl.mean() * temperature ** 2


def hidden_mse(student: tuple, teacher: tuple) -> torch.Tensor:
    """Per-layer hidden states, each (B, T, D), embeddings first -> mean over layers and tokens of
    |h_s - h_t|^2 / |h_t|^2. Relative per token: the residual stream's norm grows with depth and a few
    tokens (attention sinks) carry norms 100x the rest, which an absolute error would let dominate."""
    if len(student) != len(teacher) or student[-1].shape != teacher[-1].shape:
        raise LatentKVError(f"--hidden-weight matches layer by layer, but the student has {len(student) - 1} layers "
                            f"of width {student[-1].shape[-1]} and the teacher {len(teacher) - 1} of "
                            f"{teacher[-1].shape[-1]}; use the source as --teacher or drop --hidden-weight")
    errs = [((s.float() - t.float()).pow(2).sum(-1) / t.float().pow(2).sum(-1).clamp(min=1e-6)).mean()
            for s, t in zip(student[1:], teacher[1:])]
    return torch.stack(errs).mean()


def cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token CE: logits (B, T, V), ids (B, T) -> scalar over the T - 1 predicted tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class TeacherCache:
    """One safetensors file per packed window: top-k teacher log-probs and ids, reused across runs.

    A manifest pins the data fingerprint, window length, k and temperature; another run with a
    different one is refused rather than silently distilled from the wrong targets."""

    def __init__(self, path: str | Path, manifest: dict):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "manifest.json"
        if meta.is_file():
            old = json.loads(meta.read_text())
            if old != manifest:
                diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
                raise LatentKVError(f"teacher cache {self.path} was made for other settings ({', '.join(diff)} "
                                    "differ); use another --teacher-cache folder or delete it")
        else:
            write_file_atomic(meta, json.dumps(manifest, indent=2))

    def _file(self, window: int) -> Path:
        return self.path / f"w{window:09d}.safetensors"

    def get(self, window: int):
        f = self._file(window)
        if not f.is_file():
            return None
        t = load_file(str(f))
        return t["logp"], t["idx"]

    def put(self, window: int, logp: torch.Tensor, idx: torch.Tensor) -> None:
        write_file_atomic(self._file(window), save({"logp": logp.contiguous(), "idx": idx.contiguous()}))
