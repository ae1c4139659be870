"""Local MLA layers: DuoAttention / RazorAttention composed with MLA.

A layer marked local attends only to its first `sinks` tokens (attention sinks) and to keys within
`window` positions of the query (its own included); its cache keeps just those latents, so its
bytes stop growing, while retrieval layers keep every token. Which layers may go local is a
measured choice (`reports.duo`); here is the mechanism:

- `local_mask` is the one rule, used on every path (no cache, a full cache, `LatentSinkLayer`), so
  a local model computes the same function however it is cached;
- `LatentSinkLayer` is a cache layer holding sinks + the last `window - 1` tokens, with their
  positions (RoPE was applied at the original positions when the token was written);
- `install.set_local_layers` marks layers and records the choice in the conversion record, so
  `save`/`load` keep it; `install.held_bytes` counts what a cache holds at a context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import LatentKVError


@dataclass(frozen=True)
class LocalSpan:
    """What a local layer sees: the first `sinks` tokens and keys at distance < `window`."""

    sinks: int = 4
    window: int = 256

    def __post_init__(self):
        if self.sinks < 0 or self.window < 1:
            raise LatentKVError(f"a local layer needs sinks >= 0 and window >= 1, got {self.sinks} and {self.window}")

    def held(self, context: int) -> int:
        """Tokens a local layer's cache holds after `context` tokens."""
        return min(context, self.sinks + self.window - 1)


def local_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, span: LocalSpan) -> torch.Tensor:
    """q_pos (B, t), k_pos (s,) or (B, s) token positions -> (B, 1, t, s) bool, True = may attend."""
    k = k_pos if k_pos.dim() == 2 else k_pos[None]
    dist = q_pos[:, :, None] - k[:, None, :]  # (B, t, s)
    return ((dist >= 0) & ((dist < span.window) | (k[:, None, :] < span.sinks)))[:, None]


class LatentSinkLayer(DynamicLayer):
    """A local layer's latent cache: `c_kv (B, 1, <= sinks + window - 1, r)`, `k_pe` alike, and their
    positions. An update returns every token the step may need (held + new), then trims to what later
    queries can still see."""

    def __init__(self, span: LocalSpan):
        super().__init__()
        self.span, self.seen = span, 0
        self.positions = self.step_positions = None  # (held,), (held + new,) long

    @property
    def c_kv(self) -> torch.Tensor | None:
        return self.keys

    @property
    def k_pe(self) -> torch.Tensor | None:
        return self.values

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
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def key_positions(cache, layer_idx: int, keys: int, device) -> torch.Tensor:
    """(s,) positions of the `keys` keys a layer attends to after its cache update: a sink layer's own;
    a full cache (or none) holds every token from position 0."""
    layer = cache.layers[layer_idx] if cache is not None and hasattr(cache, "layers") else None
    if isinstance(layer, LatentSinkLayer):
        return layer.step_positions
    return torch.arange(keys, device=device)
