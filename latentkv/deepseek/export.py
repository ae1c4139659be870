"""Export a converted model as a stock DeepSeek-V3 checkpoint (transformers, vLLM, SGLang).

What makes the export compute the same function as our runtime:
- softmax scale: engines use (n + p)^-0.5; fitting the latent norm already folded the ratio to the
  source's d^-0.5 into the query rows in float32 (`latent_norm.engine_softmax_scale`); a checkpoint
  from before that has it folded here;
- RoPE: engines rotate the p rope dims at rope_theta'^(-2j/p) in interleaved pairs. We keep
  source frequencies; when they are the m = p/2 fastest ones, theta' = theta^(p/d) reproduces
  them exactly (and llama3 scaling, a function of the wavelength only, carries over unchanged).
  Our half-split rows are permuted to the interleaved layout (`layout.py`);
- the latent RMSNorm (`kv_a_layernorm`) must be in the model (see conversion/latent_norm.py);
- no q/kv/o biases (an export-grade conversion has folded a source's biases away, with a measured
  cost: conversion/biases.py), no sliding windows, one (r, p) for every layer, SiLU MLPs: otherwise
  the export refuses with the reason.
The MLP, norms and embeddings keep their names (Llama/Mistral/Qwen2 and a dense DeepSeek-V3 layer
share them). `config.json` carries our conversion record under `latentkv`, which engines ignore.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterator

import torch

from ..errors import LatentKVError
from ..families import embedding_scale, logit_softcap
from ..io.atomic import atomic_output_dir, check_output_dir
from ..io.shards import ShardWriter
from ..record import record_of
from ..runtime.install import is_mla
from .card import model_card
from .layout import engine_config, interleave_order, kernel_warning, query_fold, reorder_rope_rows, rope_parameters

FORMATS = ("deepseek_v3",)


def exportable_dims(model):
    """The one MLADims every layer shares, or a one-line error naming what cannot be exported."""
    layers = [layer.self_attn for layer in model.model.layers]
    if record_of(model) is None or not is_mla(model):
        raise LatentKVError("export needs a model converted by latentkv; run `latentkv convert` first")
    if any(a.dims.q_factored for a in layers):
        raise LatentKVError("this conversion holds its query factored (a native conversion); stock engines read a "
                            "dense q_proj: convert with --target deepseek_v3 for an exportable model")
    if any(a.local for a in layers):
        raise LatentKVError("local layers (sinks + window) have no DeepSeek-V3 form: stock engines would attend to "
                            "every token; export the model with all layers full (set_local_layers(model, []))")
    if any(a.dims.qk_norm for a in layers):
        raise LatentKVError(f"{model.config.model_type}'s QK-norm scales every key by a per-token 1/rms (cached beside "
                            "c_kv here), which DeepSeek-V3 engines cannot express; use the native latentkv checkpoint")
    extras = [what for what, has in (("soft-cap attention scores", logit_softcap(model.config) is not None),
                                     ("scale embeddings", embedding_scale(model) != 1.0)) if has]
    if extras:
        raise LatentKVError(f"{model.config.model_type} models {' and '.join(extras)} and carry extra norms, none of "
                            "which DeepSeek-V3 has; use the native latentkv checkpoint instead")
    if any(a.dims.qk_rope_head_dim == 0 for a in layers):
        raise LatentKVError("some layers use no RoPE (SmolLM3's NoPE layers) and cache no rope key, while DeepSeek-V3 "
                            "rotates a rope key in every layer with one shape; use the native latentkv checkpoint")
    dims = {a.dims for a in layers}
    if len(dims) > 1:
        raise LatentKVError("per-layer ranks (--rank-allocation) have no DeepSeek-V3 form; convert with uniform ranks")
    d = dims.pop()
    if not d.latent_norm:
        raise LatentKVError("stock DeepSeek-V3 engines always normalise the latent, and this model has no latent norm; "
                            "convert with --latent-norm (or --target deepseek_v3)")
    if d.q_bias or d.kv_a_bias or d.o_bias:
        raise LatentKVError("the model still has attention biases (Qwen2-style), which DeepSeek-V3 projections in "
                            "vLLM/SGLang lack; convert with --target deepseek_v3, which folds them away (and reports the cost)")
    if any(a.sliding_window for a in layers):
        raise LatentKVError("sliding-window layers have no DeepSeek-V3 form (it attends globally); export refuses "
                            "rather than change the function")
    if getattr(model.config, "hidden_act", "silu") != "silu":
        raise LatentKVError(f"MLP activation {model.config.hidden_act!r}: DeepSeek-V3 dense layers use silu")
    return d


def kept_frequencies(model) -> torch.Tensor:
    """(m,) source frequency index of each rope pair, the same in every layer, else an error."""
    idx = [layer.self_attn.rope_freq_idx for layer in model.model.layers]
    if any(not torch.equal(i, idx[0]) for i in idx):
        raise LatentKVError("layers keep different RoPE frequencies; DeepSeek-V3 has one rope_theta. "
                            "Convert with --rope rorope-export (or --target deepseek_v3)")
    return idx[0]


def engine_tensors(model, dims, freq_idx: torch.Tensor, fold: float = 1.0) -> Iterator[tuple[str, torch.Tensor]]:
    """DeepSeek-V3 tensors one at a time: attention rows folded/permuted (new tensors), everything else
    under its own name as the model holds it (no copy), so an export never holds a second whole state.
    fold: a query factor the engines' rope scaling needs (`layout.query_fold`)."""
    order = interleave_order(freq_idx)
    # 1 unless the checkpoint predates the fold at conversion, or YaRN at factor > 1 scales the softmax
    alpha = dims.softmax_scale / dims.engine_scale * fold
    state = model.state_dict()
    for name, t in state.items():
        if name.endswith(("rope_freq_idx", "rotary_emb.inv_freq")):
            continue
        t = reorder_rope_rows(name, t.detach(), dims, order)
        if abs(alpha - 1) > 1e-6 and name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            t = t * alpha
        if name.endswith("mlp.gate_up_proj.weight"):  # Phi-3's fused MLP: DeepSeek-V3 names its halves apart
            gate, up = t.chunk(2)
            yield name.replace("gate_up_proj", "gate_proj"), gate.contiguous()
            yield name.replace("gate_up_proj", "up_proj"), up.contiguous()
            continue
        yield name, t.contiguous()
    if "lm_head.weight" not in state:  # tied: vLLM's DeepSeek loader reads lm_head.weight itself
        yield "lm_head.weight", state["model.embed_tokens.weight"].detach().clone()


def export(model, out: str | Path, tokenizer=None, fmt: str = "deepseek_v3", overwrite: bool = False,
           max_shard_size: str | int = "5GB") -> Path:
    """Write `model` (a latentkv conversion, e.g. from `load_model(DIR)`) as a stock checkpoint; atomic."""
    if fmt not in FORMATS:
        raise LatentKVError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if isinstance(model, (str, Path)):
        raise LatentKVError(f"export() takes a model; load {model} first with latentkv.load_model")
    check_output_dir(out, overwrite)
    dims = exportable_dims(model)
    freq_idx = kept_frequencies(model)
    rope = rope_parameters(model, freq_idx)
    config = engine_config(model, dims, rope)
    config["latentkv"] = record_of(model)
    warning = kernel_warning(dims)
    if warning:
        warnings.warn(warning, stacklevel=2)
    with atomic_output_dir(out, overwrite) as tmp:
        write_shards(engine_tensors(model, dims, freq_idx, query_fold(rope)), tmp, parse_size(max_shard_size))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "README.md").write_text(model_card(config["latentkv"], dims, model.config.num_hidden_layers,
                                                  value_bytes=next(model.parameters()).element_size()))
        model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def parse_size(size: str | int) -> int:
    """"5GB", "500MB", "100KB" or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    if text.isdigit():
        return int(text)
    raise LatentKVError(f"--max-shard-size {size!r}: give a size like 5GB, 500MB or 100KB")


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, max_bytes: int) -> None:
    """Write (name, tensor) pairs as safetensors shards of at most `max_bytes` (a larger tensor gets its
    own), holding one shard at a time; named model.safetensors, or model-0000k-of-0000n.safetensors with
    an index when there is more than one (the names transformers writes)."""
    writer, files, current, size = ShardWriter(folder), [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            files.append(f"shard-{len(files):05d}.partial")
            writer.write(files[-1], current)
        current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            flush()
        if any(t.data_ptr() == v.data_ptr() for v in current.values()):
            t = t.clone()  # safetensors refuses two names on one storage
        current[name], size = t, size + nbytes
    flush()
    if len(files) == 1:
        writer.rename(files[0], "model.safetensors")
        return
    for k, file in enumerate(files, 1):
        writer.rename(file, f"model-{k:05d}-of-{len(files):05d}.safetensors")
    writer.finish()
