"""The files of a native checkpoint: `model.safetensors` (or, from a streaming conversion, shards listed
in `model.safetensors.index.json`) + `latentkv.json` + tokenizer and generation config.

There is deliberately no `config.json`: stock `from_pretrained` must not mistake an MLA
checkpoint for its source architecture and fill k_proj/v_proj with random weights.
`latentkv.json` = {"record": conversion record, "source_config": the source HF config}.
Building a model from these files is `runtime.checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import LatentKVError
from .shards import INDEX

WEIGHTS, META = "model.safetensors", "latentkv.json"


def write_meta(path: Path, record: dict, source_config) -> None:
    """`latentkv.json`: the conversion record and the source's HF config (minus our own fields)."""
    config = source_config.to_dict()
    for key in ("latentkv", "quantization_config"):
        config.pop(key, None)
    (Path(path) / META).write_text(json.dumps({"record": record, "source_config": config}, indent=2))


def write_weights(model, path: Path) -> None:
    safetensors.torch.save_file(unique_state(model), str(Path(path) / WEIGHTS), metadata={"format": "pt"})


def unique_state(model) -> dict[str, torch.Tensor]:
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


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """One `model.safetensors`, or the shards a streaming conversion wrote (listed in the index)."""
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
