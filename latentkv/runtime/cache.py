"""A `transformers` cache that holds only what MLA needs: the latent and the shared rope key.

Per layer: `c_kv (B, 1, T, r)` and `k_pe (B, 1, T, p)`, nothing else. Two ways to hold them:
- grown by concatenation to exactly the tokens seen (default; any caller, any length);
- with `capacity` (generation knows its final length): one preallocated buffer
  `(B, 1, capacity, r + p)` per layer, written in place, so a decode step copies nothing and the
  absorbed path reads `[c_kv, k_pe]` as one tensor (`LatentLayer.joint`).
Either way the bytes held are `bytes_per_token() * B * T` once T reaches the capacity.

Sliding-window layers (Mistral, Qwen2 upper layers, Gemma-2's every other layer) keep only the
last `window - 1` tokens, as transformers' own sliding layers do, when the cache is built from
the model (`LatentCache(model)`): their bytes stop growing at the window.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import LatentKVError
from .install import mla_layers


class LatentLayer(DynamicLayer):
    """One layer's latent cache. `keys` holds `c_kv`, `values` holds `k_pe` (transformers' slot names)."""

    def __init__(self, capacity: int | None = None):
        super().__init__()
        self.capacity, self.buffer, self.length = capacity, None, 0

    @property
    def c_kv(self) -> torch.Tensor | None:
        return self.keys

    @property
    def k_pe(self) -> torch.Tensor | None:
        return self.values

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor, *args, **kwargs):
        """c_kv (B, 1, t, r), k_pe (B, 1, t, p) -> every cached c_kv (B, 1, T, r) and k_pe (B, 1, T, p)."""
        if self.capacity is None:
            return super().update(c_kv, k_pe)
        if self.buffer is None:
            b, _, _, r = c_kv.shape
            self.buffer = c_kv.new_empty(b, 1, self.capacity, r + k_pe.shape[-1])
            self.is_initialized, self.device = True, c_kv.device
        end = self.length + c_kv.shape[-2]
        if end > self.capacity:
            raise LatentKVError(f"latent cache full: {end} tokens exceed the capacity of {self.capacity}; "
                                "create LatentCache with a larger capacity")
        r = c_kv.shape[-1]
        self.buffer[:, :, self.length:end, :r] = c_kv
        self.buffer[:, :, self.length:end, r:] = k_pe
        self._view(end, r)
        return self.keys, self.values

    def _view(self, end: int, r: int) -> None:
        self.length = end
        self.keys, self.values = self.buffer[:, :, :end, :r], self.buffer[:, :, :end, r:]

    def joint(self) -> torch.Tensor | None:
        """[c_kv, k_pe] of every cached token as one (B, 1, T, r + p) view (capacity mode), else None."""
        return None if self.buffer is None else self.buffer[:, :, : self.length]

    def crop(self, tokens_to_remove: int) -> None:
        if self.buffer is None:
            return super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            self._view(max(0, self.length + tokens_to_remove), self.keys.shape[-1])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.buffer is None:
            return super().batch_select_indices(indices)
        self.buffer = self.buffer[indices.to(self.buffer.device)]
        self._view(self.length, self.keys.shape[-1])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.buffer is None:
            return super().batch_repeat_interleave(repeats)
        self.buffer = self.buffer.repeat_interleave(repeats, dim=0)
        self._view(self.length, self.keys.shape[-1])

    def nbytes(self) -> int:
        if self.buffer is not None:
            return self.buffer.numel() * self.buffer.element_size()
        return _held_bytes(self)


class LatentWindowLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer's latent cache: `c_kv (B, 1, <= window - 1, r)`, `k_pe (B, 1, <= window - 1, p)`;
    a step sees those plus its own tokens, and the mask sizes follow (transformers' sliding layer)."""

    c_kv = LatentLayer.c_kv
    k_pe = LatentLayer.k_pe

    def joint(self) -> None:
        return None

    def nbytes(self) -> int:
        return _held_bytes(self)


class LatentCache(Cache):
    """Latent KV cache for models converted by latentkv; pass as `cache=` to `model(...)`/`generate`.

    `model` (optional) lets the cache report `bytes_per_token()` before anything is stored;
    `capacity` (tokens per sequence) preallocates each layer's buffer (see the module docstring).
    """

    def __init__(self, model=None, capacity: int | None = None):
        self.capacity = capacity
        if model is None:  # layers appear as they are used; windows are then applied by the mask alone
            super().__init__(layer_class_to_replicate=LatentLayer)
            self._widths = None
            return
        self._widths = _latent_widths(model)
        super().__init__(layers=[LatentWindowLayer(a.sliding_window) if a.sliding_window else LatentLayer(capacity)
                                 for a in _mla_layers(model)])

    def update(self, c_kv, k_pe, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(LatentLayer(self.capacity))
        return super().update(c_kv, k_pe, layer_idx, *args, **kwargs)

    def joint(self, layer_idx: int) -> torch.Tensor | None:
        return self.layers[layer_idx].joint() if layer_idx < len(self.layers) else None

    def bytes_per_token(self) -> int:
        """Bytes one token (one sequence) occupies across all layers."""
        if self._widths is not None:
            widths, size = self._widths
            return sum(widths) * size
        return sum(layer.keys.shape[-1] * layer.keys.element_size() + layer.values.shape[-1] * layer.values.element_size()
                   for layer in self.layers if layer.is_initialized)

    def nbytes(self) -> int:
        """Bytes actually held in the cache tensors right now (the whole buffer in capacity mode)."""
        return sum(layer.nbytes() for layer in self.layers)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds, so callers can check nothing but latents is stored."""
        return [t for layer in self.layers if layer.is_initialized
                for t in ((layer.buffer,) if layer.buffer is not None else (layer.keys, layer.values))]


def _held_bytes(layer) -> int:
    """Bytes of a grown (not preallocated) layer's c_kv and k_pe."""
    if not layer.is_initialized:
        return 0
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


def _mla_layers(model) -> list:
    attns = mla_layers(model)
    if not attns:
        raise ValueError("LatentCache(model) needs a model converted by latentkv (no MLA layers found)")
    return attns


def _latent_widths(model) -> tuple[list[int], int]:
    size = next(model.parameters()).element_size()
    return [a.dims.cache_values_per_token for a in _mla_layers(model)], size
