"""Native checkpoint of a converted model: `model.safetensors` (or, from a streaming conversion,
shards listed in `model.safetensors.index.json`) + `latentkv.json` + tokenizer.

There is deliberately no `config.json`: stock `from_pretrained` must not mistake an MLA
checkpoint for its source architecture and fill k_proj/v_proj with random weights.
`latentkv.json` = {"record": conversion record, "source_config": the source HF config}.
(The DeepSeek-V3 export for stock engines is a separate command.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import LatentKVError

WEIGHTS, META = "model.safetensors", "latentkv.json"


def save(model, tokenizer, out: str | Path, overwrite: bool = False, extra=None) -> Path:
    """Write a converted model atomically; refuses to replace `out` unless `overwrite`.
    extra: optional callable(tmp_dir) that adds files inside the same atomic write."""
    from safetensors.torch import save_file

    from .atomic import atomic_output_dir
    from .conversion import record_of

    record = record_of(model)
    if record is None:
        raise LatentKVError("save() expects a model converted by latentkv.convert; save source models with save_pretrained")
    with atomic_output_dir(out, overwrite) as tmp:
        save_file(_unique_state(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_meta(tmp, record, model.config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return Path(out)


def write_meta(path: Path, record: dict, source_config) -> None:
    """`latentkv.json`: the conversion record and the source's HF config (minus our own fields)."""
    config = source_config.to_dict()
    for key in ("latentkv", "quantization_config"):
        config.pop(key, None)
    (Path(path) / META).write_text(json.dumps({"record": record, "source_config": config}, indent=2))


def _unique_state(model) -> dict:
    """State dict with tied tensors stored once, under their first name (input embeddings before
    lm_head), so that `tie_weights()` on load restores the tie in the right direction."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.contiguous()
    return out


def read_meta(path: str | Path) -> dict:
    try:
        meta = json.loads((Path(path) / META).read_text())
        meta["record"]["layers"], meta["source_config"]["model_type"]  # noqa: B018 - presence check
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LatentKVError(f"corrupted checkpoint {path}: unreadable {META} ({type(e).__name__}); "
                            "re-run `latentkv convert`") from None


def load(path: str | Path, dtype: torch.dtype = torch.float32):
    """-> (converted model in eval mode, tokenizer or None). Weights load via safetensors only."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .conversion import install_mla
    from .mla import MLADims

    path = Path(path)
    meta = read_meta(path)
    src_cfg = dict(meta["source_config"])
    config = AutoConfig.for_model(src_cfg.pop("model_type"), **src_cfg)
    config.latentkv = meta["record"]
    state = _read_weights(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_mla(model, [MLADims(**d) for d in meta["record"]["layers"]])
    _load_state(model, state, path)
    model.to(dtype)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.eval(), tok


def _read_weights(path: Path) -> dict:
    """One `model.safetensors`, or the shards a streaming conversion wrote (listed in the index)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .shards import INDEX

    files = [WEIGHTS]
    if not (path / WEIGHTS).is_file() and (path / INDEX).is_file():
        try:
            files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LatentKVError(f"corrupted checkpoint {path}: unreadable {INDEX} ({type(e).__name__}); "
                                "re-run `latentkv convert`") from None
    state = {}
    for name in files:
        try:
            state.update(load_file(str(path / name)))
        except (OSError, SafetensorError) as e:
            raise LatentKVError(f"corrupted checkpoint {path}: cannot read {name} ({str(e)[:120]}); "
                                "re-run `latentkv convert`") from None
    return state


def _load_state(model, state: dict, path: Path) -> None:
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    meta_left = [n for n, p in model.named_parameters() if p.is_meta]
    if result.unexpected_keys or meta_left:
        missing = (meta_left or result.unexpected_keys)[:3]
        raise LatentKVError(f"corrupted checkpoint {path}: tensors missing or unexpected ({', '.join(missing)}, ...); "
                            "re-run `latentkv convert`")
