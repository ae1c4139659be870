"""Error metrics of the latent: how to weigh the error of the rank-r approximation of Y = [K_nope; V].

Each factorizer (`--factorizer`) returns (stats, metric) for `linalg.low_rank`: the input statistics it trusts
(None = weights only) and metric, the (m, m) PSD weight on the rows of Y (None = identity; a list
of square blocks for a block-diagonal one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..families import SourceAttention, SourceLayout
from .rope import augment, row_energy


@dataclass(frozen=True)
class WeightSVD:
    """MHA2MLA's joint SVD of the weights: ignores the inputs."""

    name = "svd"

    def weights(self, parts: dict, src: SourceAttention, layout: SourceLayout, stats):
        return None, None


@dataclass(frozen=True)
class ActivationPCA:
    """PCA of the calibration outputs Y (activation-aware), with keys and values balanced to equal
    mean energy first (TransMLA's BKV) so the larger side does not take the whole latent."""

    name = "pca"
    balance: bool = True

    def weights(self, parts: dict, src: SourceAttention, layout: SourceLayout, stats):
        k_rows = parts["k_nope"].flatten(0, 1)  # (Gn*n, D+1)
        if not self.balance or k_rows.shape[0] == 0:
            return stats, None
        sigma = stats.sigma
        v_rows = _augmented_values(src)
        ratio = _energy(v_rows, sigma) / _energy(k_rows, sigma).clamp(min=1e-30)
        diag = torch.cat((torch.full((k_rows.shape[0],), float(ratio)), torch.ones(v_rows.shape[0])))
        return stats, torch.diag(diag.double())


@dataclass(frozen=True)
class OutputAware:
    """Error weighted where it lands: a key error by the second moment of the queries that read it
    (times the spread of those heads' outputs, which turns a score error into an output error),
    a value error through each head's slice of `o_proj`. `key_weight` scales the key side (chosen on
    held-out calibration text: BENCHMARKS.md, "design notes")."""

    name = "output"
    key_weight: float = 0.3

    def weights(self, parts: dict, src: SourceAttention, layout: SourceLayout, stats):
        sigma = stats.sigma
        w_o = src.w_o.double().view(src.w_o.shape[0], layout.num_heads, layout.head_dim)  # (D, H, d)
        spread = _output_spread(src, layout, sigma, w_o)  # (H,)
        q = parts["q_nope"]  # (H, k, D+1), k' space = q_map @ q (when there is a map)
        gn, n = parts["k_nope"].shape[:2]
        # the costly part, in fp32 (a weight: its rounding is harmless), 8 heads per product
        sig32, per_head = sigma.float(), []
        for c in range(0, q.shape[0], 8):
            qc = q[c: c + 8].float()
            per_head.append(((qc.flatten(0, 1) @ sig32).view(qc.shape) @ qc.transpose(1, 2)).double())
        per_head = spread[:, None, None] * torch.cat(per_head)  # (H, k, k)
        blocks = [_group_sum(per_head, parts["q_map"], parts["nope_group"] == g) for g in range(gn)]
        scale2 = src.softmax_scale ** 2 * self.key_weight
        v_blocks = [sum(w_o[:, h].T @ w_o[:, h] for h in _heads_of(g, layout)) for g in range(layout.num_kv_heads)]
        return stats, [scale2 * b for b in blocks] + v_blocks  # block-diagonal


def _group_sum(per_head: torch.Tensor, q_map: torch.Tensor | None, heads: torch.Tensor) -> torch.Tensor:
    """sum over the group's heads of M_h A_h M_h^T (n, n); A (H, k, k), M (H, n, k) or None (M = I).
    As one product [M_h A_h]_h [M_h]_h^T: no (H, n, n) stack (2.8 GB for Llama-2-7B's MHA)."""
    if q_map is None:
        return per_head[heads].sum(0)
    m = q_map[heads]  # (h, n, k)
    left = (m @ per_head[heads]).transpose(0, 1).flatten(1)  # (n, h*k)
    return left @ m.transpose(0, 1).flatten(1).T


def _heads_of(g: int, layout: SourceLayout) -> range:
    return range(g * layout.group_size, (g + 1) * layout.group_size)


def _augmented_values(src: SourceAttention) -> torch.Tensor:
    return augment(src.w_v, src.b_v)


def _energy(rows: torch.Tensor, sigma) -> torch.Tensor:
    """Mean over rows of E[(w x)^2]."""
    return row_energy(rows, sigma).mean()


def _output_spread(src: SourceAttention, layout: SourceLayout, sigma, w_o) -> torch.Tensor:
    """(H,): E|W_o^h (v - E v)|^2 = tr(W_o^hT W_o^h Cov(v_g)), how far a head's output moves when its
    attention shifts."""
    v = _augmented_values(src)  # (G*d, D+1)
    mean = sigma[:-1, -1]
    cov = sigma.clone()
    cov[:-1, :-1] -= torch.outer(mean, mean)
    cov[-1, :], cov[:, -1] = 0, 0  # centred: the constant input carries no spread
    d = layout.head_dim
    v_cov = [vg @ cov @ vg.T for vg in v.view(layout.num_kv_heads, d, -1)]  # (d, d) per KV group
    return torch.stack([((w_o[:, h].T @ w_o[:, h]) * v_cov[h // layout.group_size]).sum()
                        for h in range(layout.num_heads)])


FACTORIZERS = {"svd": WeightSVD(), "pca": ActivationPCA(), "output": OutputAware()}
