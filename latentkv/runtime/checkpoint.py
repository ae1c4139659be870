"""Save a converted model natively and build it back (the files are `io.checkpoint`)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ..errors import LatentKVError
from ..io.atomic import atomic_output_dir
from ..io.checkpoint import read_meta, read_weights, write_meta, write_weights
from ..record import record_of
from .install import install_mla
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
    src_cfg = dict(meta["source_config"])
    config = AutoConfig.for_model(src_cfg.pop("model_type"), **src_cfg)
    config.latentkv = meta["record"]
    state = read_weights(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_mla(model, [MLADims(**d) for d in meta["record"]["layers"]])
    _load_state(model, state, path)
    model.to(dtype)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.eval(), tok


def _load_state(model, state: dict, path: Path) -> None:
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    meta_left = [n for n, p in model.named_parameters() if p.is_meta]
    if result.unexpected_keys or meta_left:
        missing = (meta_left or result.unexpected_keys)[:3]
        raise LatentKVError(f"corrupted checkpoint {path}: tensors missing or unexpected ({', '.join(missing)}, ...); "
                            "re-run `latentkv convert`")
