"""Module surgery, kept thin: put MLAAttention layers into an HF decoder model and find them again."""

from __future__ import annotations

from dataclasses import asdict

from ..errors import LatentKVError
from ..families import sliding_window
from ..record import record_of
from .local import LocalSpan
from .mla import MLAAttention, MLADims

LOCAL_RECORD_KEY = "local_layers"


def install_layer(model, i: int, dims: MLADims, state: dict | None = None) -> MLADims:
    """Swap layer i's `self_attn` for an MLAAttention (in place); load `state` if given."""
    layer = model.model.layers[i]
    ref = next(layer.self_attn.parameters())
    window = sliding_window(model.config, layer.self_attn, i)
    attn = MLAAttention(dims, model.config, i, window).to(device=ref.device, dtype=ref.dtype)
    if state is not None:
        attn.load_state_dict(state)
    layer.self_attn = attn
    return dims


def install_mla(model, dims: list[MLADims], state: list[dict] | None = None) -> None:
    for i, d in enumerate(dims):
        install_layer(model, i, d, None if state is None else state[i])


def mla_layers(model) -> list[MLAAttention]:
    """Every MLAAttention of `model`, in layer order ([] for a source model)."""
    return [m for m in model.modules() if isinstance(m, MLAAttention)]


def is_mla(model) -> bool:
    """True when every decoder layer's attention is an MLAAttention (a whole conversion)."""
    layers = model.model.layers
    return len(layers) > 0 and all(isinstance(layer.self_attn, MLAAttention) for layer in layers)


def set_local_layers(model, layers, span: LocalSpan | None = None) -> None:
    """Mark `layers` (indices) of a converted model local with `span`, every other layer full; recorded
    in the conversion record (`local_layers`) so that `save` and `load` keep it. [] makes all full."""
    attns = mla_layers(model)
    if not attns:
        raise LatentKVError("local layers need a model converted by latentkv (no MLA layers found)")
    span = span or LocalSpan()
    layers = sorted({int(i) for i in layers})
    bad = [i for i in layers if not 0 <= i < len(attns)]
    if bad:
        raise LatentKVError(f"local layers {bad} do not exist: the model has layers 0-{len(attns) - 1}")
    sliding = [i for i in layers if attns[i].sliding_window]
    if sliding:
        raise LatentKVError(f"layers {sliding} already have a sliding window; mark only full-attention layers local")
    for i, attn in enumerate(attns):
        attn.local = span if i in layers else None
    record = record_of(model)
    if record is not None:
        if layers:
            record[LOCAL_RECORD_KEY] = {"layers": layers, **asdict(span)}
        else:
            record.pop(LOCAL_RECORD_KEY, None)


def apply_recorded_local_layers(model) -> None:
    """Restore the local layers a loaded model's record names (no-op without them)."""
    entry = (record_of(model) or {}).get(LOCAL_RECORD_KEY)
    if entry:
        set_local_layers(model, entry["layers"], LocalSpan(entry["sinks"], entry["window"]))


def held_bytes(model, context: int, value_bytes: int | None = None) -> int:
    """Cache bytes one sequence holds after `context` tokens: full layers every token, local ones their
    sinks and window (sliding-window source layers their window), at the model's dtype unless given."""
    size = value_bytes or next(model.parameters()).element_size()
    total = 0
    for attn in mla_layers(model):
        tokens = attn.local.held(context) if attn.local else min(context, (attn.sliding_window or context + 1) - 1)
        total += attn.dims.cache_values_per_token * size * tokens
    return total
