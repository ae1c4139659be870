"""Safetensors checkpoints read one tensor at a time and written one shard at a time.

A Hugging Face directory holds either `model.safetensors` or shards listed in
`model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}). Reading goes
through `safe_open`, which maps the file and copies out only the tensor asked for, so a layer
costs its own bytes and no more. Every shard's header is checked up front, so a missing or
truncated shard is named before any long work starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from ..errors import LatentKVError
from .atomic import write_file_atomic

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def check_weights(path: str | os.PathLike) -> None:
    """One-line error if a checkpoint directory's safetensors files are missing, truncated or corrupt
    (read before a loader that would fail deep inside with a traceback); no-op without any."""
    path = Path(path)
    if (path / INDEX).is_file() or (path / SINGLE).is_file():
        ShardedCheckpoint(path)


class ShardedCheckpoint:
    """Tensor name -> shard file of one checkpoint directory; `get` reads a tensor lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.weight_map = _weight_map(self.path)  # name -> file name inside path
        self.stored: dict[str, str] = {}  # name -> the name it is stored under (tied tensors saved once)
        self.dtypes: dict[str, torch.dtype] = {}
        for name in sorted(set(self.weight_map.values())):
            self._check_shard(name)

    def _check_shard(self, file: str) -> None:
        with self._open(file) as f:
            keys = set(f.keys())
            self.dtypes.update({k: _dtype(f.get_slice(k).get_dtype()) for k in keys})
        listed = [n for n, f in self.weight_map.items() if f == file and n not in keys]
        if listed:
            raise LatentKVError(f"shard {self.path / file} lacks {listed[0]} (and {len(listed) - 1} more) that "
                                f"{INDEX} lists; the download is incomplete, fetch the checkpoint again")

    def _open(self, file: str):
        """A fresh handle: the map is dropped with it, so pages read stay out of this process's
        resident memory (holding maps open would count every shard read so far)."""
        path = self.path / file
        if not path.is_file():
            raise LatentKVError(f"shard {path} listed in {INDEX} is missing; fetch the checkpoint again")
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise LatentKVError(f"shard {path} is corrupt or truncated ({str(e)[:100]}); fetch it again") from None

    def tie(self, name: str, stored: str) -> None:
        """Serve `name` from the tensor saved as `stored` (tied embeddings are often written once)."""
        self.weight_map[name] = self.weight_map[stored]
        self.stored[name] = stored

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.weight_map if n.startswith(prefix)]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, copied out of the mapped file."""
        if name not in self.weight_map:
            raise LatentKVError(f"checkpoint {self.path} has no tensor {name}; is it a complete "
                                "Llama/Mistral/Qwen2 checkpoint?")
        return self.get_many([name])[name]

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Several tensors, each shard opened once."""
        out = {}
        for file in dict.fromkeys(self.weight_map[n] for n in names):
            with self._open(file) as f:
                out.update({n: f.get_tensor(self.stored.get(n, n)) for n in names if self.weight_map[n] == file})
        return {n: out[n] for n in names}

    def dtype(self) -> torch.dtype:
        """The storage dtype of the first floating tensor (from the headers)."""
        return next((d for d in self.dtypes.values() if d.is_floating_point), torch.float32)

    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.weight_map.values()))


def _weight_map(path: Path) -> dict[str, str]:
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("empty weight_map")
            return {str(k): str(v) for k, v in weight_map.items()}
        except (ValueError, KeyError, TypeError) as e:
            raise LatentKVError(f"{path / INDEX} is unreadable ({type(e).__name__}: {str(e)[:80]}); "
                                "fetch the checkpoint again") from None
    if (path / SINGLE).is_file():
        try:
            with safe_open(str(path / SINGLE), framework="pt") as f:
                return {k: SINGLE for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise LatentKVError(f"{path / SINGLE} is corrupt or truncated ({str(e)[:100]}); fetch it again") from None
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise LatentKVError(f"{path} holds pickle weights (.bin/.pt), which can run code when loaded; convert them "
                            "to safetensors first (transformers: save_pretrained(..., safe_serialization=True))")
    raise LatentKVError(f"{path} has no {SINGLE} or {INDEX}; point to a Hugging Face checkpoint directory")


class ShardWriter:
    """Writes named shards into a directory, each atomically, and the index that lists them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.path / f".{file}.tmp"
        try:
            safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, self.path / file)
        finally:
            tmp.unlink(missing_ok=True)
        self.add(file, tensors)

    def add(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        """Record a shard already on disk (a resumed run re-lists the shards it kept)."""
        for name, t in tensors.items():
            self.weight_map[name] = file
            self.total_size += t.numel() * t.element_size()

    def rename(self, file: str, final: str) -> None:
        """Move a written shard to its final name (known only once every shard is written)."""
        os.replace(self.path / file, self.path / final)
        self.weight_map = {k: final if v == file else v for k, v in self.weight_map.items()}

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        write_file_atomic(self.path / INDEX, json.dumps(index, indent=2))


def shard_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one shard file (used to re-list a kept shard on resume; meta tensors, no data)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), dtype=_dtype(f.get_slice(k).get_dtype()), device="meta")
                for k in f.keys()}


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}.get(name, torch.uint8)
