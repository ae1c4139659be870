"""A `transformers` cache that holds only what MLA needs: the latent and the shared rope key.

Per layer: `c_kv (B, 1, T, r)` and `k_pe (B, 1, T, p)`, nothing else. The tensors are grown
to exactly the tokens seen, so the bytes held are `bytes_per_token() * T * B`, exactly.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class LatentLayer(DynamicLayer):
    """One layer's latent cache. `keys` holds `c_kv`, `values` holds `k_pe` (transformers' slot names)."""

    @property
    def c_kv(self) -> torch.Tensor | None:
        return self.keys

    @property
    def k_pe(self) -> torch.Tensor | None:
        return self.values

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class LatentCache(Cache):
    """Latent KV cache for models converted by latentkv; pass as `cache=` to `model(...)`/`generate`.

    `model` (optional) lets the cache report `bytes_per_token()` before anything is stored.
    """

    def __init__(self, model=None):
        super().__init__(layer_class_to_replicate=LatentLayer)
        self._widths = _latent_widths(model) if model is not None else None

    def bytes_per_token(self) -> int:
        """Bytes one token (one sequence) occupies across all layers."""
        if self._widths is not None:
            widths, size = self._widths
            return sum(widths) * size
        return sum(layer.keys.shape[-1] * layer.keys.element_size() + layer.values.shape[-1] * layer.values.element_size()
                   for layer in self.layers if layer.is_initialized)

    def nbytes(self) -> int:
        """Bytes actually held in the cache tensors right now."""
        return sum(layer.nbytes() for layer in self.layers)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds, so callers can check nothing but latents is stored."""
        return [t for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values)]


def _latent_widths(model) -> tuple[list[int], int]:
    from .mla import MLAAttention

    attns = [m for m in model.modules() if isinstance(m, MLAAttention)]
    if not attns:
        raise ValueError("LatentCache(model) needs a model converted by latentkv (no MLA layers found)")
    size = next(model.parameters()).element_size()
    return [a.dims.cache_values_per_token for a in attns], size
