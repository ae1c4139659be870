"""Local MLA layers: DuoAttention / RazorAttention composed with MLA.

A layer marked local attends only to its first `sinks` tokens (attention sinks) and to keys within
`window` positions of the query (its own included); its cache keeps just those latents, so its
bytes stop growing, while retrieval layers keep every token. Which layers may go local is a
measured choice (`reports.duo`); here is the mechanism:

- `local_mask` is the one rule, used on every path (no cache, a full cache, `LatentSinkLayer`), so
  a local model computes the same function however it is cached;
- `cache.LatentSinkLayer` is a cache layer holding sinks + the last `window - 1` tokens, with their
  positions (RoPE was applied at the original positions when the token was written);
- `install.set_local_layers` marks layers and records the choice in the conversion record, so
  `save`/`load` keep it; `install.held_bytes` counts what a cache holds at a context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def key_positions(cache, layer_idx: int, keys: int, device) -> torch.Tensor:
    """(s,) positions of the `keys` keys a layer attends to after its cache update: a cache layer that trims
    (`cache.LatentSinkLayer`) reports them as `step_positions`; a full cache (or none) holds every token
    from position 0."""
    layer = cache.layers[layer_idx] if cache is not None and hasattr(cache, "layers") else None
    positions = getattr(layer, "step_positions", None)
    return positions if positions is not None else torch.arange(keys, device=device)
