"""Attention kernels and RoPE helpers the MLA layer runs on: the reference (eager) kernel, the view
transformers' kernels read from a module, and the half-split rotation.

Shapes: B batch, h query heads, t query tokens, s key tokens, k score dim, v value dim, p rotated dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., p) rotated by the broadcastable cos/sin (..., p), half-split layout."""
    return x * cos + rotate_half(x) * sin


def select_rope(cos: torch.Tensor, sin: torch.Tensor, freq_idx: torch.Tensor):
    """Source cos/sin `(B, T, d)` (half-split layout) -> `(B, 1, T, p)` for the kept frequencies."""
    c = cos[..., freq_idx]  # (B, T, p/2)
    s = sin[..., freq_idx]
    return torch.cat((c, c), -1).unsqueeze(1), torch.cat((s, s), -1).unsqueeze(1)


def soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-2's logit soft-capping, cap * tanh(scores / cap); identity without a cap."""
    return scores if cap is None else torch.tanh(scores / cap) * cap


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """Reference attention; `key`/`value` may have 1 head (broadcast) or as many as `query`.

    query (B, h, t, k), key (B, 1|h, s, k), value (B, 1|h, s, v) -> (B, t, h, v), weights.
    """
    scores = soft_cap(torch.matmul(query, key.transpose(-1, -2)) * scaling, softcap)  # (B, h, t, s)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)  # (B, h, t, v)
    return out.transpose(1, 2).contiguous(), probs


@dataclass(frozen=True)
class KernelView:
    """What transformers' attention kernels read from the calling module.

    The expanded path has as many key heads as query heads; the absorbed path has one.
    """

    num_key_value_groups: int
    training: bool = False
    is_causal: bool = True
