"""Save a converted model natively and build it back (the files are `io.checkpoint`)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ..errors import LatentKVError, first_line
from ..io.atomic import atomic_output_dir
from ..io.checkpoint import META, read_meta, read_weights, write_meta, write_weights
from ..record import FORMAT_VERSION, record_of
from .install import apply_recorded_local_layers, install_mla
from .mla import MLADims


def save(model, tokenizer, out: str | Path, overwrite: bool = False, extra=None) -> Path:
    """Write a converted model atomically; refuses to replace `out` unless `overwrite`.
    extra: optional callable(tmp_dir) that adds files inside the same atomic write."""
    record = record_of(model)
    if record is None:
        raise LatentKVError("save() expects a model converted by latentkv.convert; save source models with save_pretrained")
    with atomic_output_dir(out, overwrite) as tmp:
        write_weights(model, tmp)
        write_meta(tmp, record, model.config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return Path(out)


def load(path: str | Path, dtype: torch.dtype = torch.float32):
    """-> (converted model in eval mode, tokenizer or None). Weights load via safetensors only."""
    path = Path(path)
    meta = read_meta(path)
    config, dims = _checked_meta(meta, path)
    state = read_weights(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_mla(model, dims)
    apply_recorded_local_layers(model)
    _load_state(model, state, path)
    model.to(dtype)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.eval(), tok


POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                 "intermediate_size", "head_dim", "max_position_embeddings")


def _checked_meta(meta: dict, path: Path):
    """`latentkv.json` -> (HF config, per-layer MLADims), or one line naming the first bad field."""
    def bad(what: str):
        return LatentKVError(f"corrupted checkpoint {path}: {META} {what}; re-run `latentkv convert`")

    record, src_cfg = meta["record"], dict(meta["source_config"])
    version = record.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise LatentKVError(f"{path} has checkpoint format_version {version!r}; this latentkv reads format_version "
                            f"{FORMAT_VERSION} or older: upgrade latentkv or re-run `latentkv convert`")
    for key in POSITIVE_INTS:
        value = src_cfg.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise bad(f"has source_config.{key} = {value!r}, not a positive integer")
    layers = record["layers"]
    if not isinstance(layers, list) or len(layers) != src_cfg.get("num_hidden_layers", len(layers)):
        raise bad(f"lists {len(layers) if isinstance(layers, list) else repr(layers)} layers for "
                  f"num_hidden_layers = {src_cfg.get('num_hidden_layers')}")
    for i, d in enumerate(layers):
        wrong = [k for k, v in d.items() if isinstance(v, int) and v < 0] if isinstance(d, dict) else ["the entry"]
        if wrong:
            raise bad(f"has layers[{i}].{wrong[0]} = {d[wrong[0]] if isinstance(d, dict) else d!r}")
    try:
        config = AutoConfig.for_model(src_cfg.pop("model_type"), **src_cfg)
        dims = [MLADims(**d) for d in layers]
    except (TypeError, ValueError, KeyError) as e:
        raise bad(f"is invalid ({first_line(e)})") from None
    config.latentkv = record
    return config, dims


def _load_state(model, state: dict, path: Path) -> None:
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    for name, t in state.items():
        if name in shapes and tuple(t.shape) != shapes[name]:
            raise LatentKVError(f"corrupted checkpoint {path}: {name} has shape {tuple(t.shape)} but {META} implies "
                                f"{shapes[name]}; re-run `latentkv convert`")
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    meta_left = [n for n, p in model.named_parameters() if p.is_meta]
    if result.unexpected_keys or meta_left:
        missing = (meta_left or result.unexpected_keys)[:3]
        raise LatentKVError(f"corrupted checkpoint {path}: tensors missing or unexpected ({', '.join(missing)}, ...); "
                            "re-run `latentkv convert`")
