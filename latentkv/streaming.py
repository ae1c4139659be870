"""Streaming conversion: a sharded safetensors checkpoint converted layer by layer in bounded memory.

Peak memory is one decoder layer in fp32, the calibration activations (N, T, D) fp32 (twice when
the converted prefix is tracked) and the (D+1)^2 statistics, whatever the depth; embeddings and
the LM head are copied one tensor at a time. Per layer i, on calibration windows that have
flowed through layers < i:

  one-shot     statistics of the source's activations h_src (what `convert` gets from hooks)
  sequential   statistics of the converted prefix's h_new and their cross moment with h_src
  latent norm  (`--target deepseek_v3`) fitted on h_new, as `add_latent_norm` does

so the result equals the in-memory `convert` with the same split (tests/test_streaming.py).
Work lands in OUT.partial/: a shard per layer, then the activations after it. A killed run resumes
at the first unfinished layer when the source and settings are the same, else starts clean; OUT
appears only when whole (one rename).
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import check_output_dir, publish_dir, write_file_atomic
from .calibrate import InputStats, Moments, record_attention_inputs
from .calibrated import _run, causal_mask, split_at
from .errors import LatentKVError
from .methods import ExactConfig, LowRankConfig, budget_values, config_to_dict
from .shards import ShardedCheckpoint, ShardWriter, shard_tensors

STREAM_SPLIT = 3 / 8  # rope share the held-out split search picked at 50 % and 25 % on SmolLM2
LAYERS = "model.layers."


def stream_dims(layout, config) -> tuple[int, int]:
    """(kv_lora_rank, qk_rope_head_dim). The in-memory split search scores whole-model NLL, which a
    stream never holds, so a budget takes the split the search picked most often."""
    dims = config.dims(layout)
    if dims is None:
        dims = split_at(layout, config, budget_values(config, layout), STREAM_SPLIT)
        print(f"streaming: rope {dims[1]} + latent {dims[0]} (the split search needs the whole model; "
              "pass --kv-lora-rank and --qk-rope-head-dim to choose)", file=sys.stderr, flush=True)
    if not isinstance(config, ExactConfig):
        from .conversion import check_dims

        check_dims(layout, *dims, **({"rope": config.rope} if isinstance(config, LowRankConfig) else {}))
    return dims


def check_streamable(config) -> None:
    if isinstance(config, LowRankConfig) and config.rank_allocation != "uniform":
        raise LatentKVError(f"--rank-allocation {config.rank_allocation} scores the whole model on held-out text, "
                            "which a streaming conversion never holds; drop it or convert in memory")


def check_fits_in_memory(source) -> None:
    """Refuse an in-memory conversion of a local checkpoint that cannot fit, pointing to --stream."""
    from .doctor import available_memory
    from .shards import INDEX, SINGLE

    path = Path(str(source)).expanduser()
    if not path.is_dir() or not ((path / SINGLE).is_file() or (path / INDEX).is_file()):
        return
    try:
        ckpt = ShardedCheckpoint(path)
    except LatentKVError:
        return  # loading reports a broken checkpoint in its own words
    need, avail = ckpt.nbytes() * 4 / ckpt.dtype().itemsize * 2, available_memory()  # fp32 source + converted copy
    if avail is not None and need > avail:
        raise LatentKVError(f"converting {path} in memory needs about {need / 2**30:.1f} GiB (source and converted "
                            f"copy in fp32) but {avail / 2**30:.1f} GiB is available; add --stream to convert it "
                            "layer by layer")


class Stream:
    """The state of one streaming conversion: the source, the skeleton model, the activations."""

    def __init__(self, source: Path, config, device: str):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .families import logit_softcap, source_layout

        self.ckpt = ShardedCheckpoint(source)  # every shard's header checked here
        try:
            hf = AutoConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as e:
            raise LatentKVError(f"cannot read {source}/config.json ({str(e).splitlines()[0][:120]}); "
                                "point to a Hugging Face checkpoint directory") from None
        self.layout = source_layout(hf)  # refuses unsupported families with the reason
        self.config, self.device, self.store_dtype = config, torch.device(device), self.ckpt.dtype()
        self.oneshot = isinstance(config, LowRankConfig) and not config.sequential
        self.attention = self.oneshot and config.attn_moment > 0
        # attention-averaged moments need the weights; SDPA cannot soft-cap (Gemma-2)
        kernel = "eager" if self.attention or logit_softcap(hf) is not None else "sdpa"
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(hf, attn_implementation=kernel)
        self.model.config._name_or_path = str(source)
        self.h_src = self.h_new = None  # (N, T, D) fp32 on the CPU

    @property
    def calibrated(self) -> bool:
        return isinstance(self.config, LowRankConfig)

    def start(self, ids: torch.Tensor) -> None:
        """ids (N, T) -> embedded activations (only the rows used; the table is not kept)."""
        table = self.ckpt.get("model.embed_tokens.weight")
        if int(ids.max()) >= table.shape[0]:
            raise LatentKVError(f"the tokenizer produced id {int(ids.max())} but the model has {table.shape[0]} "
                                "embeddings: the tokenizer does not belong to this checkpoint")
        from .families import embedding_scale

        h = table[ids].float() * embedding_scale(self.model)  # Gemma's sqrt(D), here in the stream's fp32
        self.h_src = h if self.oneshot or self.sequential else None
        self.h_new = h.clone() if self.sequential or self.latent_norm else None

    @property
    def sequential(self) -> bool:
        return self.calibrated and self.config.sequential

    @property
    def latent_norm(self) -> bool:
        return self.calibrated and self.config.latent_norm

    def load_layer(self, i: int):
        """Materialise layer i (fp32, CPU) from the shards; -> the decoder layer module."""
        prefix = f"{LAYERS}{i}."
        raw = self.ckpt.get_many(self.ckpt.names(prefix))
        state = {n[len(prefix):]: raw.pop(n).float() for n in list(raw)}  # each bf16 copy freed as it goes
        layer = self.model.model.layers[i]
        layer.to_empty(device="cpu")  # buffers the shards do not carry
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)  # fp32 whatever the config says
        if missing or unexpected:
            raise LatentKVError(f"layer {i} of {self.ckpt.path} has {'no ' + missing[0] if missing else unexpected[0]}; "
                                "the checkpoint does not match its config.json")
        from .conversion import check_finite_layer

        check_finite_layer(i, layer.self_attn)
        return layer

    def context(self, i: int, layer):
        """(rope, pos, mask) for layer i on the device, the mask additive (eager takes no bool mask)."""
        from .families import sliding_window

        t = (self.h_src if self.h_src is not None else self.h_new).shape[1]
        pos = torch.arange(t, device=self.device)[None]
        rotary = self.model.model.rotary_emb.to(self.device)
        rope = rotary(torch.zeros(1, t, 1, device=self.device), pos)
        allowed = causal_mask(t, sliding_window(self.model.config, layer.self_attn, i)).to(self.device)
        mask = torch.zeros(allowed.shape, device=self.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return rope, pos, mask

    @torch.no_grad()
    def step(self, i: int, dims) -> dict:
        """Convert layer i in place and advance the activations -> timings and fit numbers."""
        from .conversion import _float32, install_layer, layer_dims
        from .families import read_attention
        from .layers import CONVERTERS

        t0 = time.perf_counter()
        layer = self.load_layer(i)
        t_read = time.perf_counter()
        stats, info = None, {}
        if self.calibrated:
            rope, pos, mask = self.context(i, layer)
            stats = self.source_pass(layer, rope, pos, mask)
        t_calib = time.perf_counter()
        if self.h_new is None:  # no more forward passes: the MLP can wait in its stored dtype (0.35 GB at 8B)
            layer.mlp.to(self.store_dtype)
        src = read_attention(layer.self_attn)
        sd = CONVERTERS[type(self.config)](_float32(src), self.layout, self.config, dims, stats)
        install_layer(self.model, i, layer_dims(self.layout, sd, src), sd)
        t_fact = time.perf_counter()
        if self.latent_norm:
            from .latent_norm import norm_layer

            x = torch.cat([layer.input_layernorm(self.h_new[c: c + 4]) for c in range(0, len(self.h_new), 4)])
            info["latent_norm"] = norm_layer(self.model, i, x.reshape(-1, x.shape[-1]))
        if self.h_new is not None:
            self.h_new = _run(layer.to(self.device), self.h_new, rope, pos, mask, self.device)
            layer.to("cpu")
        if self.sequential:
            info["hidden_rel_err"] = float((self.h_new - self.h_src).norm() / self.h_src.norm())
        t_end = time.perf_counter()
        return {"layer": i, "read_s": round(t_read - t0, 2), "calibrate_s": round(t_calib - t_read + t_end - t_fact, 2),
                "factorize_s": round(t_fact - t_calib, 2), **info}

    def source_pass(self, layer, rope, pos, mask) -> InputStats:
        """Run h_src through the source layer; -> this layer's statistics (one-shot or sequential)."""
        d = self.layout.hidden_size
        if self.sequential:
            sigma, cross = Moments.empty(d), Moments.empty(d)
            for c in range(0, len(self.h_new), 4):
                x_new = layer.input_layernorm(self.h_new[c: c + 4])
                sigma.add(x_new)
                cross.add(layer.input_layernorm(self.h_src[c: c + 4]), x_new)
            stats = InputStats(sigma.second(), cross.second())
        layer.to(self.device)
        moments, averaged = [Moments.empty(d)], [Moments.empty(d)] if self.attention else None
        if self.oneshot:
            with record_attention_inputs([layer.self_attn], moments, averaged):
                self.h_src = _run(layer, self.h_src, rope, pos, mask, self.device)
            stats = InputStats(moments[0].second(), attn_sigma=averaged[0].second() if averaged else None)
        elif self.h_src is not None:
            self.h_src = _run(layer, self.h_src, rope, pos, mask, self.device)
        layer.to("cpu")
        return stats

    def layer_shard(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's converted tensors in the checkpoint's own dtype (integer buffers kept)."""
        out = {}
        for name, t in self.model.model.layers[i].state_dict().items():
            out[f"{LAYERS}{i}.{name}"] = t.to(self.store_dtype) if t.is_floating_point() else t
        return out

    def free(self, i: int) -> None:
        self.model.model.layers[i].to("meta")


def convert_streaming(source, config, out, *, tokenizer=None, calib_ids: torch.Tensor | None = None,
                      device: str = "cpu", overwrite: bool = False, progress: bool = True) -> dict:
    """Convert the checkpoint directory `source` into the native checkpoint `out` -> the record.

    calib_ids (N, T): ready calibration windows (else from `config.calib` with the source's own
    tokenizer, or `tokenizer`). `device` runs the layers' forward passes (factorizing stays on CPU).
    """
    from .calibrated import calibration_ids, split_ids

    source, out = Path(source), check_output_dir(out, overwrite).absolute()
    check_streamable(config)
    start = time.perf_counter()
    stream = Stream(source, config, device)
    dims = stream_dims(stream.layout, config)
    ids = None
    if stream.calibrated:
        tokenizer = tokenizer or _tokenizer(source, required=calib_ids is None)
        ids = split_ids(calib_ids if calib_ids is not None else calibration_ids(tokenizer, config))[0]
    work = Work(out, {"source": str(source.absolute()), "source_bytes": stream.ckpt.nbytes(),
                      "config": config_to_dict(config), "dims": list(dims), "calib": _fingerprint(ids)}, progress)
    done = work.resume(stream)
    if ids is not None and done == 0:
        stream.start(ids)
    if done == 0:
        work.writer.write("embed.safetensors", {n: stream.ckpt.get(n) for n in stream.ckpt.names("model.embed")})
    bar = tqdm(range(done, stream.layout.num_layers), desc="convert (streaming)", disable=not progress,
               initial=done, total=stream.layout.num_layers)
    for i in bar:
        timing = stream.step(i, dims)
        t0 = time.perf_counter()
        work.writer.write(f"layer-{i:05d}.safetensors", stream.layer_shard(i))
        stream.free(i)
        _trim_heap()
        work.layer_done(i, stream, {**timing, "write_s": round(time.perf_counter() - t0, 2), "peak_rss_gib": _rss()})
    return work.finish(stream, config, tokenizer or _tokenizer(source, required=False),
                       time.perf_counter() - start, ids)


class Work:
    """OUT.partial/: run.json (what this run is), layer shards, act.safetensors + state.json after each layer."""

    def __init__(self, out: Path, plan: dict, progress: bool):
        self.out, self.plan, self.progress = out, plan, progress
        self.dir = out.with_name(out.name + ".partial")
        self.writer = ShardWriter(self.dir)
        self.layers: list[dict] = []

    def resume(self, stream: Stream) -> int:
        """-> the first layer to convert (0 = start clean, discarding other runs' leftovers)."""
        run, state = self.dir / "run.json", self.dir / "state.json"
        if run.is_file() and state.is_file() and json.loads(run.read_text()) == self.plan:
            done = json.loads(state.read_text())
            self._relist(done["done"])
            self.layers = done["layers"]
            if done["done"] and stream.calibrated:
                from safetensors.torch import load_file

                act = load_file(str(self.dir / "act.safetensors"))
                stream.h_src, stream.h_new = act.get("h_src"), act.get("h_new")
            self._say(f"resuming the interrupted conversion in {self.dir} at layer {done['done']}")
            return done["done"]
        if self.dir.exists():
            self._say(f"discarding {self.dir}: left by an interrupted run with other settings")
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        write_file_atomic(run, json.dumps(self.plan, indent=2))
        self._save_state(0)
        return 0

    def _relist(self, done: int) -> None:
        for f in ["embed.safetensors"] + [f"layer-{i:05d}.safetensors" for i in range(done)]:
            self.writer.add(f, shard_tensors(self.dir / f))

    def layer_done(self, i: int, stream: Stream, timing: dict) -> None:
        """Called after layer i's shard is on disk: activations, then the state that points past it."""
        from safetensors.torch import save_file

        if stream.h_src is not None or stream.h_new is not None:
            act = {k: v for k, v in (("h_src", stream.h_src), ("h_new", stream.h_new)) if v is not None}
            save_file(act, str(self.dir / ".act.tmp"))
            (self.dir / ".act.tmp").replace(self.dir / "act.safetensors")
        self.layers.append({**timing, "dims": stream.model.model.layers[i].self_attn.dims.to_dict()})
        self._save_state(i + 1)

    def _save_state(self, done: int) -> None:
        write_file_atomic(self.dir / "state.json", json.dumps({"done": done, "layers": self.layers}))

    def _say(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    def finish(self, stream: Stream, config, tokenizer, seconds: float, ids) -> dict:
        """Head tensors, index, latentkv.json, tokenizer; then OUT appears in one rename -> the record."""
        from .checkpoint import write_meta
        from .conversion import conversion_record
        from .mla import MLADims

        ckpt = stream.ckpt
        rest = [n for n in ckpt.names() if not n.startswith((LAYERS, "model.embed"))]
        self.writer.write("head.safetensors", {n: ckpt.get(n) for n in rest})
        self.writer.finish()
        dims = [MLADims(**layer["dims"]) for layer in self.layers]
        record = conversion_record(stream.model, stream.layout, config, dims, seconds)
        record["streaming"] = {"layers": self.layers, "device": str(stream.device), "peak_rss_gib": _rss(),
                               "calib_windows": None if ids is None else list(ids.shape)}
        write_meta(self.dir, record, stream.model.config)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.dir)
        _generation_config(stream, ckpt.path).save_pretrained(self.dir)
        for name in ("run.json", "state.json", "act.safetensors"):
            (self.dir / name).unlink(missing_ok=True)
        publish_dir(self.dir, self.out)
        return record


def _generation_config(stream: Stream, source: Path):
    from transformers import GenerationConfig

    if (source / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source)
    return GenerationConfig.from_model_config(stream.model.config)


def _tokenizer(source: Path, required: bool):
    from transformers import AutoTokenizer

    if not (source / "tokenizer_config.json").is_file() and not (source / "tokenizer.json").is_file():
        if required:
            raise LatentKVError(f"{source} has no tokenizer files, which calibration needs to read --calib; add "
                                "tokenizer.json/tokenizer_config.json or use --method svd")
        return None
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LatentKVError(f"cannot load the tokenizer in {source} ({str(e).splitlines()[0][:120]}); "
                            "fix or remove its tokenizer files") from None


def _fingerprint(ids: torch.Tensor | None) -> str | None:
    return None if ids is None else hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16] + f"-{list(ids.shape)}"


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS after each layer: glibc keeps them otherwise, and the
    resident size would creep up by tens of MB per layer (measured at 8B) from fragmentation alone."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _rss() -> float:
    """Peak resident memory of this process so far, GiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
