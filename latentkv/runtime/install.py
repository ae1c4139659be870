"""Module surgery, kept thin: put MLAAttention layers into an HF decoder model and find them again."""

from __future__ import annotations

from ..families import sliding_window
from .mla import MLAAttention, MLADims


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
