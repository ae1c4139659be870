"""Small numeric helpers of the MLA layer: RMS scales as the source norms compute them, and per-head
low-rank factors of folded decode weights."""

from __future__ import annotations

import torch


def inv_rms(u: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms(u) over the last dim (kept, size 1), in fp32 at least as the source norms compute it."""
    f = u.to(torch.promote_types(u.dtype, torch.float32))
    return torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)


def unit_rms(u: torch.Tensor, eps: float) -> torch.Tensor:
    """u / rms(u) over the last dim, in fp32 at least."""
    return (u.to(torch.promote_types(u.dtype, torch.float32)) * inv_rms(u, eps)).to(u.dtype)


def rms_norm(x: torch.Tensor, norm: torch.nn.RMSNorm) -> torch.Tensor:
    """`norm`(x) as transformers' DeepseekV3RMSNorm and the engines compute it: normalised in fp32, cast
    back to x's dtype, then scaled by the weight. Under bf16 autocast (float32 weights, bf16 x) this also
    stays off torch's unfused mixed-dtype path, which warns."""
    return norm.weight * unit_rms(x, norm.eps)


def factor_heads(w: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """w (h, m, D) -> U (h, m, k), V (h*k, D) with w_h = U_h V_h up to `rtol` of the largest
    singular value, k the largest numerical rank over heads."""
    h, m, D = w.shape
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)  # (h, m, j), (h, j), (h, j, D)
    k = max(1, int((s > rtol * s[:, :1]).sum(-1).max()))
    return (u[..., :k] * s[:, None, :k]).to(w.dtype), vh[:, :k].reshape(h * k, D).to(w.dtype)
