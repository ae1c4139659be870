"""A `transformers` cache that holds only what MLA needs: the latent and the shared rope key.

Per layer: `c_kv (B, 1, T, r)` and `k_pe (B, 1, T, p)`, nothing else. Two ways to hold them:
- grown by concatenation to exactly the tokens seen (default; any caller, any length);
- with `capacity` (generation knows its final length): one preallocated buffer
  `(B, 1, capacity, r + p)` per layer, written in place, so a decode step copies nothing and the
  absorbed path reads `[c_kv, k_pe]` as one tensor (`LatentLayer.joint`).
Either way the bytes held are `bytes_per_token() * B * T` once T reaches the capacity.

With `cache_dtype` (a `quant.CacheFormat` or its name: fp8_e4m3, int8, int4) each token's latent is
written quantized, as bytes, and every read dequantizes the whole cache to the model's dtype: a query
reads the stored latents of every token, its own included (the perplexity protocol of a quantized
cache, `evaluation.perplexity`). The rope key stays in the model's dtype unless the format says
`rope`; QK-norm key scales always do. Quantized layers grow by concatenation (no `capacity` buffer).

Sliding-window layers (Mistral, Qwen2 upper layers, Gemma-2's every other layer) keep only the
last `window - 1` tokens, as transformers' own sliding layers do, when the cache is built from
the model (`LatentCache(model)`): their bytes stop growing at the window. Local layers
(`install.set_local_layers`, DuoAttention-style) keep their sinks and window (`LatentSinkLayer`).
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import LatentKVError
from ..families import source_layout
from .install import mla_layers
from .local import LocalSpan
from .quant import CacheFormat, as_format


class LatentLayer(DynamicLayer):
    """One layer's latent cache. `keys` holds `c_kv`, `values` holds `k_pe` (transformers' slot names)."""

    def __init__(self, capacity: int | None = None, fmt: CacheFormat | None = None, rope_dims: int = 0):
        super().__init__()
        self.capacity, self.buffer, self.length = (None if fmt else capacity), None, 0
        self.fmt, self.rope_dims = fmt, rope_dims  # rope_dims: k_pe's rotated width p (QK-norm scales follow)

    @property
    def c_kv(self) -> torch.Tensor | None:
        return self.keys

    @property
    def k_pe(self) -> torch.Tensor | None:
        return self.values

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor, *args, **kwargs):
        """c_kv (B, 1, t, r), k_pe (B, 1, t, p) -> every cached c_kv (B, 1, T, r) and k_pe (B, 1, T, p)."""
        if self.fmt is not None:
            return packed_update(self, super().update, c_kv, k_pe)
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
        # repeat_interleave returns a view of a (B, repeats, 1, capacity, r + p) tensor; inductor rebuilds a
        # compiled step's inputs from their base, so the buffer must be a tensor of its own
        self.buffer = self.buffer.repeat_interleave(repeats, dim=0).clone()
        self._view(self.length, self.keys.shape[-1])

    def nbytes(self) -> int:
        if self.buffer is not None:
            return self.buffer.numel() * self.buffer.element_size()
        return _held_bytes(self)

    def __deepcopy__(self, memo):
        """A copy whose c_kv / k_pe are views of its own buffer again, as the original's are (deepcopy
        alone keeps the shared storage but not the view relation, and a compiled decode step traced on
        one aliasing structure fails on the other)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        if new.buffer is not None:
            new._view(new.length, new.keys.shape[-1])
        return new


class LatentWindowLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer's latent cache: `c_kv (B, 1, <= window - 1, r)`, `k_pe (B, 1, <= window - 1, p)`;
    a step sees those plus its own tokens, and the mask sizes follow (transformers' sliding layer)."""

    c_kv = LatentLayer.c_kv
    k_pe = LatentLayer.k_pe

    def __init__(self, sliding_window: int, fmt: CacheFormat | None = None, rope_dims: int = 0):
        super().__init__(sliding_window)
        self.fmt, self.rope_dims = fmt, rope_dims

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor, *args, **kwargs):
        if self.fmt is not None:
            return packed_update(self, super().update, c_kv, k_pe)
        return super().update(c_kv, k_pe, *args, **kwargs)

    def joint(self) -> None:
        return None

    def nbytes(self) -> int:
        return _held_bytes(self)


class LatentSinkLayer(DynamicLayer):
    """A local layer's latent cache: `c_kv (B, 1, <= sinks + window - 1, r)`, `k_pe` alike, and their
    positions. An update returns every token the step may need (held + new), then trims to what later
    queries can still see."""

    def __init__(self, span: LocalSpan):
        super().__init__()
        self.span, self.seen = span, 0
        self.positions = self.step_positions = None  # (held,), (held + new,) long

    c_kv = LatentLayer.c_kv
    k_pe = LatentLayer.k_pe

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor, *args, **kwargs):
        """c_kv (B, 1, t, r), k_pe (B, 1, t, p) -> held + new c_kv (B, 1, s, r) and k_pe (B, 1, s, p)."""
        new = torch.arange(self.seen, self.seen + c_kv.shape[-2], device=c_kv.device)
        if not self.is_initialized:
            self.lazy_initialization(c_kv, k_pe)
            full_c, full_p, pos = c_kv, k_pe, new
        else:
            full_c, full_p = torch.cat((self.keys, c_kv), -2), torch.cat((self.values, k_pe), -2)
            pos = torch.cat((self.positions, new))
        self.seen += c_kv.shape[-2]
        keep = (pos < self.span.sinks) | (pos > self.seen - self.span.window)  # the next query is at `seen`
        self.keys, self.values, self.positions = full_c[:, :, keep], full_p[:, :, keep], pos[keep]
        self.step_positions = pos
        return full_c, full_p

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the model-level mask is built for full layers; a local layer replaces it with `local_mask`
        return self.seen + query_length, 0

    def joint(self) -> None:
        return None

    def crop(self, tokens_to_remove: int) -> None:
        raise LatentKVError("a local layer's cache cannot be cropped (assisted decoding): use full layers")

    def nbytes(self) -> int:
        return _held_bytes(self)


class LatentCache(Cache):
    """Latent KV cache for models converted by latentkv; pass as `cache=` to `model(...)`/`generate`.

    `model` (optional) lets the cache report `bytes_per_token()` before anything is stored;
    `capacity` (tokens per sequence) preallocates each layer's buffer (see the module docstring);
    `cache_dtype` stores latents quantized (needs `model`).
    """

    def __init__(self, model=None, capacity: int | None = None, cache_dtype: str | CacheFormat = "model"):
        self.capacity = capacity
        self.format = as_format(cache_dtype)
        fmt = self.format if self.format.quantized else None
        if model is None:  # layers appear as they are used; windows are then applied by the mask alone
            if fmt is not None:
                raise LatentKVError("a quantized latent cache needs the model: LatentCache(model, cache_dtype=...)")
            super().__init__(layer_class_to_replicate=LatentLayer)
            self._token_bytes = None
            return
        attns = _mla_layers(model)
        if fmt is not None and any(a.local for a in attns):
            raise LatentKVError("a quantized latent cache does not combine with local layers yet; use --cache-dtype "
                                "model or make every layer full")
        self._token_bytes = [token_bytes(a.dims, self.format, next(model.parameters()).element_size()) for a in attns]
        super().__init__(layers=[self._layer(a, capacity, fmt) for a in attns])

    @staticmethod
    def _layer(attn, capacity, fmt):
        """The cache layer an MLA layer needs: local (sinks + window), sliding (window), or full."""
        if attn.local is not None:
            return LatentSinkLayer(attn.local)
        if attn.sliding_window:
            return LatentWindowLayer(attn.sliding_window, fmt, attn.dims.qk_rope_head_dim)
        return LatentLayer(capacity, fmt, attn.dims.qk_rope_head_dim)

    def update(self, c_kv, k_pe, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(LatentLayer(self.capacity))
        return super().update(c_kv, k_pe, layer_idx, *args, **kwargs)

    def joint(self, layer_idx: int) -> torch.Tensor | None:
        return self.layers[layer_idx].joint() if layer_idx < len(self.layers) else None

    def bytes_per_token(self) -> int:
        """Bytes one token (one sequence) occupies across all layers."""
        if self._token_bytes is not None:
            return sum(self._token_bytes)
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


def token_bytes(dims, fmt: CacheFormat, value_bytes: int) -> int:
    """Bytes one token takes in one layer's cache: the latent in `fmt` (scales included), the rope key in
    `fmt` or at `value_bytes` each, QK-norm key scales at `value_bytes` each."""
    if not fmt.quantized:
        return dims.cache_values_per_token * value_bytes
    p = dims.qk_rope_head_dim
    rope = fmt.nbytes(p) if fmt.rope and p else p * value_bytes
    return fmt.nbytes(dims.kv_lora_rank) + rope + dims.key_scales * value_bytes


def packed_update(layer, store, c_kv: torch.Tensor, k_pe: torch.Tensor):
    """Write a quantized layer's new tokens through `store` (its base class's update, which grows or
    trims along the token axis) as bytes, and read every stored token back in the model's dtype.
    c_kv (B, 1, t, r), k_pe (B, 1, t, p [+ S]) -> (B, 1, T, r), (B, 1, T, p [+ S])."""
    fmt, p, dtype, r = layer.fmt, layer.rope_dims, c_kv.dtype, c_kv.shape[-1]
    rope, scales = fmt.rope and p > 0, k_pe.shape[-1] - p
    if rope:  # the rotated dims go quantized, the key scales after them stay exact (as raw bytes)
        parts = [fmt.quantize(k_pe[..., :p])] + ([k_pe[..., p:].contiguous().view(torch.uint8)] if scales else [])
        k_pe = torch.cat(parts, -1)
    keys, values = store(fmt.quantize(c_kv), k_pe)
    if rope:
        head = fmt.nbytes(p)
        parts = [fmt.dequantize(values[..., :head], p, dtype)]
        if scales:
            parts.append(values[..., head:].clone(memory_format=torch.contiguous_format).view(dtype))
        values = torch.cat(parts, -1)
    return fmt.dequantize(keys, r, dtype), values


class QuantizedKVCache(DynamicCache):
    """A source (GQA/MHA) model's own K/V stored in a `CacheFormat`, the baseline a latent cache competes
    with at equal bytes: keys (after RoPE) and values of each KV head and token quantized over the head
    dim (one scale per head and token, or per `group`), read back dequantized. The codes are not kept:
    the layers hold the dequantized tensors, and `bytes_per_token()` counts what the format would store."""

    def __init__(self, model, cache_dtype: str | CacheFormat):
        super().__init__(config=model.config)
        self.format = as_format(cache_dtype)
        layout = source_layout(model.config)
        self._token_bytes = 2 * layout.num_kv_heads * self.format.nbytes(layout.head_dim) * layout.num_layers

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """key_states, value_states (B, G, t, d)."""
        fake = lambda x: self.format.dequantize(self.format.quantize(x), x.shape[-1], x.dtype)  # noqa: E731
        return super().update(fake(key_states), fake(value_states), layer_idx, *args, **kwargs)

    def bytes_per_token(self) -> int:
        return self._token_bytes
