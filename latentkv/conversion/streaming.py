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

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import LatentKVError, first_line
from ..families import EMBED_PREFIX, LAYER_PREFIX, embedding_scale, logit_softcap, source_layout
from ..io.atomic import check_output_dir, exclusive
from ..io.machine import available_memory, max_rss_gib, trim_heap
from ..io.shards import INDEX, SINGLE, ShardedCheckpoint
from ..io.text import fingerprint
from .calibration import calibration_ids, calibration_record, split_ids
from .configs import LowRankConfig, config_to_dict
from .dims import fit_to_source, stream_dims
from .latent_norm import norm_layer
from .prefix import CONVERTED, SOURCE, PrefixWalk
from .rope import sample_windows
from .statistics import InputStats, Moments, record_attention_inputs
from .stream_work import Work
from .surgery import check_finite_layer, convert_attention
from .temperature import scale_logits_of

log = logging.getLogger(__name__)


def check_streamable(config) -> None:
    if isinstance(config, LowRankConfig) and config.rank_allocation != "uniform":
        why = {"spectrum": "ranks every layer's singular values against all the others' before any layer is "
                           "converted, while a streaming conversion finishes each layer before reading the next"}
        reason = why.get(config.rank_allocation, "scores the whole converted model on held-out text, which a "
                                                 "streaming conversion never holds")
        raise LatentKVError(f"--rank-allocation {config.rank_allocation} {reason}; drop it or convert in memory")


def check_fits_in_memory(source) -> None:
    """Refuse an in-memory conversion of a local checkpoint that cannot fit, pointing to --stream."""
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


def _tied_embeddings(ckpt: ShardedCheckpoint, hf) -> None:
    """Tied embeddings saved once as lm_head.weight (safetensors' save_model, our GGUF cache) serve as the
    embedding table too; a checkpoint with neither is refused before OUT.partial/ is created."""
    embed, head = f"{EMBED_PREFIX}_tokens.weight", "lm_head.weight"
    if embed not in ckpt.weight_map and head in ckpt.weight_map and getattr(hf, "tie_word_embeddings", False):
        ckpt.tie(embed, head)
    if embed not in ckpt.weight_map:
        raise LatentKVError(f"checkpoint {ckpt.path} has no tensor {embed}; is it a complete Llama/Mistral/Qwen2 "
                            "checkpoint?")


class Stream:
    """The state of one streaming conversion: the source, the skeleton model, the activations.

    Activations live in a PrefixWalk (`walk.h`: h_src, h_new, each (N, T, D) fp32 on the CPU or None)
    once `begin` has run; a run that needs no calibration has none.
    """

    def __init__(self, source: Path, config, device: str):
        self.ckpt = ShardedCheckpoint(source)  # every shard's header checked here
        try:
            hf = AutoConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as e:
            raise LatentKVError(f"cannot read {source}/config.json ({first_line(e, 120)}); "
                                "point to a Hugging Face checkpoint directory") from None
        self.layout = source_layout(hf)  # refuses unsupported families with the reason
        _tied_embeddings(self.ckpt, hf)
        config = fit_to_source(config, self.layout)
        if isinstance(config, LowRankConfig) and config.output_refit:
            log.warning("streaming conversion: o_proj is not refit to the source's attention output (that walks "
                        "long windows through both whole models); convert in memory for it")
            config = replace(config, output_refit=False)  # the record says what was done
        self.config, self.device, self.store_dtype = config, torch.device(device), self.ckpt.dtype()
        self.calibrated = isinstance(config, LowRankConfig)
        self.sequential = self.calibrated and config.sequential
        self.latent_norm = self.calibrated and config.latent_norm
        self.oneshot = self.calibrated and not config.sequential
        self.attention = self.oneshot and config.attn_moment > 0
        self.keep = sample_windows(config.rope) if self.calibrated else 0  # layer-input windows a strategy scores
        self.temperature = config.attn_temperature if self.calibrated else 1.0
        if self.calibrated and self.temperature is None:
            log.warning("streaming conversion: the attention temperature is not chosen (that scores the whole model "
                        "on calibration text); pass --attn-temperature X to fold one in")
        # attention-averaged moments need the weights; SDPA cannot soft-cap (Gemma-2)
        kernel = "eager" if self.attention or logit_softcap(hf) is not None else "sdpa"
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(hf, attn_implementation=kernel)
        self.model.config._name_or_path = str(source)
        self.walk: PrefixWalk | None = None

    def start(self, ids: torch.Tensor) -> None:
        """ids (N, T) -> embedded activations (only the rows used; the table is not kept)."""
        table = self.ckpt.get(f"{EMBED_PREFIX}_tokens.weight")
        if int(ids.max()) >= table.shape[0]:
            raise LatentKVError(f"the tokenizer produced id {int(ids.max())} but the model has {table.shape[0]} "
                                "embeddings: the tokenizer does not belong to this checkpoint")
        h = table[ids].float() * embedding_scale(self.model)  # Gemma's sqrt(D), here in the stream's fp32
        self.begin(h if self.oneshot or self.sequential else None,
                   h.clone() if self.sequential or self.latent_norm else None)

    def begin(self, h_src: torch.Tensor | None, h_new: torch.Tensor | None) -> None:
        """Start the walk from these activations (fresh, or as a resumed run saved them)."""
        # additive masks: the skeleton may run eager attention, which adds the mask
        self.walk = PrefixWalk(self.model, [h_src, h_new], device=self.device, additive=True)

    @property
    def h_src(self) -> torch.Tensor | None:
        return None if self.walk is None else self.walk.h[SOURCE]

    @property
    def h_new(self) -> torch.Tensor | None:
        return None if self.walk is None else self.walk.h[CONVERTED]

    def load_layer(self, i: int):
        """Materialise layer i (fp32, CPU) from the shards; -> the decoder layer module."""
        prefix = f"{LAYER_PREFIX}{i}."
        raw = self.ckpt.get_many(self.ckpt.names(prefix))
        state = {n[len(prefix):]: raw.pop(n).float() for n in list(raw)}  # each bf16 copy freed as it goes
        layer = self.model.model.layers[i]
        layer.to_empty(device="cpu")  # buffers the shards do not carry
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)  # fp32 whatever the config says
        if missing or unexpected:
            raise LatentKVError(f"layer {i} of {self.ckpt.path} has {'no ' + missing[0] if missing else unexpected[0]}; "
                                "the checkpoint does not match its config.json")
        check_finite_layer(i, layer.self_attn)
        return layer

    @torch.no_grad()
    def step(self, i: int, dims) -> dict:
        """Convert layer i in place and advance the activations -> timings and fit numbers."""
        t0 = time.perf_counter()
        layer = self.load_layer(i)
        t_read = time.perf_counter()
        stats, info = None, {}
        mask = self.walk.mask(i) if self.walk is not None else None  # the source layer's window
        if self.calibrated:
            stats = self.source_pass(layer, mask)
        t_calib = time.perf_counter()
        if self.h_new is None:  # no more forward passes: the MLP can wait in its stored dtype (0.35 GB at 8B)
            layer.mlp.to(self.store_dtype)
        convert_attention(self.model, i, layer.self_attn, self.layout, self.config, dims, stats)
        t_fact = time.perf_counter()
        if self.latent_norm:
            x = torch.cat([x for (x,) in self.walk.inputs(layer, CONVERTED)])
            info["latent_norm"] = norm_layer(self.model, i, x.reshape(-1, x.shape[-1]))
        if self.temperature not in (None, 1.0):
            scale_logits_of(layer.self_attn, self.temperature)
        if self.h_new is not None:
            self.walk.advance(CONVERTED, layer.to(self.device), mask)
            layer.to("cpu")
        if self.sequential:
            info["hidden_rel_err"] = float((self.h_new - self.h_src).norm() / self.h_src.norm())
        t_end = time.perf_counter()
        return {"layer": i, "read_s": round(t_read - t0, 2), "calibrate_s": round(t_calib - t_read + t_end - t_fact, 2),
                "factorize_s": round(t_fact - t_calib, 2), **info}

    def source_pass(self, layer, mask) -> InputStats:
        """Run h_src through the source layer; -> this layer's statistics (one-shot or sequential)."""
        d = self.layout.hidden_size
        if self.sequential:
            sigma, cross = Moments.empty(d, self.keep), Moments.empty(d)
            for x_new, x_src in self.walk.inputs(layer, CONVERTED, SOURCE):
                sigma.add(x_new)
                cross.add(x_src, x_new)
            stats = InputStats(sigma.second(), cross.second(), sample=sigma.sample())
        layer.to(self.device)
        moments, averaged = [Moments.empty(d, self.keep)], [Moments.empty(d)] if self.attention else None
        if self.oneshot:
            with record_attention_inputs([layer.self_attn], moments, averaged):
                self.walk.advance(SOURCE, layer, mask)
            stats = InputStats(moments[0].second(), attn_sigma=averaged[0].second() if averaged else None,
                               sample=moments[0].sample())
        elif self.h_src is not None:
            self.walk.advance(SOURCE, layer, mask)
        layer.to("cpu")
        return stats

    def layer_shard(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's converted tensors in the checkpoint's own dtype (integer buffers kept)."""
        out = {}
        for name, t in self.model.model.layers[i].state_dict().items():
            out[f"{LAYER_PREFIX}{i}.{name}"] = t.to(self.store_dtype) if t.is_floating_point() else t
        return out

    def free(self, i: int) -> None:
        self.model.model.layers[i].to("meta")


def convert_streaming(source, config, out, *, tokenizer=None, calib_ids: torch.Tensor | None = None,
                      device: str = "cpu", overwrite: bool = False, progress: bool = True) -> dict:
    """Convert the checkpoint directory `source` into the native checkpoint `out` -> the record.

    calib_ids (N, T): ready calibration windows (else from `config.calib` with the source's own
    tokenizer, or `tokenizer`). `device` runs the layers' forward passes (factorizing stays on CPU).
    """
    source, out = Path(source), check_output_dir(out, overwrite, inputs=(source,)).absolute()
    check_streamable(config)
    with exclusive(out.with_name(f".{out.name}.lock"), f"another streaming conversion is writing {out}"):
        return _convert_streaming(source, config, out, tokenizer, calib_ids, device, overwrite, progress)


def _convert_streaming(source: Path, config, out: Path, tokenizer, calib_ids, device, overwrite, progress) -> dict:
    """convert_streaming, holding OUT's lock (two runs must not share OUT.partial)."""
    start = time.perf_counter()
    stream = Stream(source, config, device)
    config = stream.config  # as the source can take it (`fit_to_source`)
    dims = stream_dims(stream.layout, config)
    ids, tokenizer, calibration = _calibration(stream, source, config, tokenizer, calib_ids)
    calib = None if ids is None else f"{fingerprint(ids)}-{list(ids.shape)}"
    work = Work(out, {"source": str(source.absolute()), "source_bytes": stream.ckpt.nbytes(),
                      "config": config_to_dict(config), "dims": list(dims), "calib": calib}, overwrite)
    done = work.resume(stream)
    if ids is not None and done == 0:
        stream.start(ids)
    if done == 0:
        work.writer.write("embed.safetensors", {n: stream.ckpt.get(n) for n in stream.ckpt.names(EMBED_PREFIX)})
    bar = tqdm(range(done, stream.layout.num_layers), desc="convert (streaming)", disable=not progress,
               initial=done, total=stream.layout.num_layers)
    for i in bar:
        timing = stream.step(i, dims)
        t0 = time.perf_counter()
        work.writer.write(f"layer-{i:05d}.safetensors", stream.layer_shard(i))
        stream.free(i)
        trim_heap()
        log.debug("streamed layer %d: %s", i, timing)
        work.layer_done(i, stream, {**timing, "write_s": round(time.perf_counter() - t0, 2), "peak_rss_gib": max_rss_gib()})
    return work.finish(stream, config, tokenizer or _tokenizer(source, required=False),
                       time.perf_counter() - start, ids, calibration)


def _calibration(stream: Stream, source: Path, config, tokenizer, calib_ids):
    """-> (fit windows or None, tokenizer, the record's calibration entry or None)."""
    if not stream.calibrated:
        return None, tokenizer, None
    tokenizer = tokenizer or _tokenizer(source, required=calib_ids is None)
    info = None
    if calib_ids is None:
        calib_ids, info = calibration_ids(tokenizer, config)
    return split_ids(calib_ids)[0], tokenizer, calibration_record(calib_ids, info)


def _tokenizer(source: Path, required: bool):
    if not (source / "tokenizer_config.json").is_file() and not (source / "tokenizer.json").is_file():
        if required:
            raise LatentKVError(f"{source} has no tokenizer files, which calibration needs to read --calib; add "
                                "tokenizer.json/tokenizer_config.json or use --method svd")
        return None
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LatentKVError(f"cannot load the tokenizer in {source} ({first_line(e, 120)}); "
                            "fix or remove its tokenizer files") from None
