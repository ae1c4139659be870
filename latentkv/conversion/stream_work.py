"""The durable side of a streaming conversion: OUT.partial/ on disk, resume, and the final publish.

OUT.partial/ holds run.json (what this run is: source, settings, calibration fingerprint), one
shard per finished layer, and, after each layer, act.safetensors (the activations the next layer
needs) then state.json (how many layers are done), in that order, so state.json never points past
what is on disk. OUT appears only when whole, in one rename.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import safetensors.torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from ..families import EMBED_PREFIX, LAYER_PREFIX
from ..io.atomic import publish_dir, write_file_atomic
from ..io.checkpoint import write_meta
from ..io.machine import max_rss_gib
from ..io.shards import ShardWriter, shard_tensors
from ..record import make_record
from .configs import config_to_dict

log = logging.getLogger(__name__)


class Work:
    """OUT.partial/: run.json (what this run is), layer shards, act.safetensors + state.json after each layer."""

    def __init__(self, out: Path, plan: dict, overwrite: bool = False):
        self.out, self.plan, self.overwrite = out, plan, overwrite
        self.dir = out.with_name(out.name + ".partial")
        self.writer = ShardWriter(self.dir)
        self.layers: list[dict] = []

    def resume(self, stream) -> int:
        """-> the first layer to convert (0 = start clean, discarding other runs' leftovers)."""
        run, state = self.dir / "run.json", self.dir / "state.json"
        if run.is_file() and state.is_file() and json.loads(run.read_text()) == json.loads(json.dumps(self.plan)):
            done = json.loads(state.read_text())
            self._relist(done["done"])
            self.layers = done["layers"]
            if done["done"] and stream.calibrated:
                act = load_file(str(self.dir / "act.safetensors"))
                stream.begin(act.get("h_src"), act.get("h_new"))
            log.info("resuming the interrupted conversion in %s at layer %d", self.dir, done["done"])
            return done["done"]
        if self.dir.exists():
            log.info("discarding %s: left by an interrupted run with other settings", self.dir)
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        write_file_atomic(run, json.dumps(self.plan, indent=2))
        self._save_state(0)
        return 0

    def _relist(self, done: int) -> None:
        for f in ["embed.safetensors"] + [f"layer-{i:05d}.safetensors" for i in range(done)]:
            self.writer.add(f, shard_tensors(self.dir / f))

    def layer_done(self, i: int, stream, timing: dict) -> None:
        """Called after layer i's shard is on disk: activations, then the state that points past it."""
        if stream.h_src is not None or stream.h_new is not None:
            act = {k: v for k, v in (("h_src", stream.h_src), ("h_new", stream.h_new)) if v is not None}
            safetensors.torch.save_file(act, str(self.dir / ".act.tmp"))
            (self.dir / ".act.tmp").replace(self.dir / "act.safetensors")
        self.layers.append({**timing, "dims": stream.model.model.layers[i].self_attn.dims.to_dict()})
        self._save_state(i + 1)

    def _save_state(self, done: int) -> None:
        write_file_atomic(self.dir / "state.json", json.dumps({"done": done, "layers": self.layers}))

    def finish(self, stream, config, tokenizer, seconds: float, ids, calibration: dict | None = None) -> dict:
        """Head tensors, index, latentkv.json, tokenizer; then OUT appears in one rename -> the record."""
        ckpt = stream.ckpt
        rest = [n for n in ckpt.names() if not n.startswith((LAYER_PREFIX, EMBED_PREFIX))]
        self.writer.write("head.safetensors", {n: ckpt.get(n) for n in rest})
        self.writer.finish()
        source = stream.layout.to_record(stream.model.config._name_or_path)
        record = make_record(source, config_to_dict(config), [layer["dims"] for layer in self.layers], seconds)
        record["streaming"] = {"layers": self.layers, "device": str(stream.device), "peak_rss_gib": max_rss_gib(),
                               "calib_windows": None if ids is None else list(ids.shape)}
        if calibration is not None:
            record["calibration"] = calibration
        write_meta(self.dir, record, stream.model.config)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.dir)
        _generation_config(stream, ckpt.path).save_pretrained(self.dir)
        for name in ("run.json", "state.json", "act.safetensors"):
            (self.dir / name).unlink(missing_ok=True)
        publish_dir(self.dir, self.out, self.overwrite)
        return record


def _generation_config(stream, source: Path):
    if (source / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source)
    return GenerationConfig.from_model_config(stream.model.config)
