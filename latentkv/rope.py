"""The RoPE side: which key dims keep their rotation, as strategies returning a `KeySplit`.

Keys are first mixed by an orthogonal `R` that commutes with RoPE (per frequency i, one G x G
matrix U_i applied to the i-th pair of every KV head, identically on both pair components), so
k' = R k. Pair (j, i) of k' is component j at frequency i. Kept pairs form the shared rotated
key `k_pe`; every other dim of k' is non-rotated ("nope") on queries and keys alike (notes §2).
Head h's query in k' space is R E_g(h)^T q_h, so scores are unchanged when nothing is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .families import SourceAttention, SourceLayout


@dataclass(frozen=True)
class KeySplit:
    """kept: (j, i) pairs in k_pe order; mix: (G, G, d/2) per-frequency U_i, or None for R = I."""

    kept: tuple[tuple[int, int], ...]
    mix: torch.Tensor | None = None

    def uniform(self, layout: SourceLayout) -> bool:
        """Every KV head keeps the same number of pairs and R = I: nope dims can stay per group."""
        counts = [sum(1 for j, _ in self.kept if j == g) for g in range(layout.num_kv_heads)]
        return self.mix is None and len(set(counts)) == 1

    def exportable(self) -> bool:
        """DeepSeek-V3 rotates d_r dims at base'^(-2i/d_r): kept frequencies must be 0..m-1, once each."""
        freqs = sorted(i for _, i in self.kept)
        return freqs == list(range(len(freqs)))


def expected_rotation(layout: SourceLayout, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, S), each (d/2,): E[cos(theta_i t)], E[sin(theta_i t)] over query-key distances t uniform in
    [0, horizon). A pair that loses its rotation is best replaced (least squares over t) by this
    mean rotation, not by the identity: slow pairs keep C ~ 1, fast ones fade to ~0."""
    theta = torch.tensor(layout.inv_freq, dtype=torch.float64)
    if horizon <= 1:
        return torch.ones_like(theta), torch.zeros_like(theta)
    angle = theta[:, None] * torch.arange(horizon, dtype=torch.float64)[None]  # (d/2, horizon)
    return angle.cos().mean(1), angle.sin().mean(1)


def drop_cost(layout: SourceLayout, horizon: int) -> torch.Tensor:
    """(d/2,): E|R(theta t) - E R|^2 / 2 = 1 - C^2 - S^2, the part of a pair's score lost when it stops
    rotating; 1 for every pair when horizon <= 1 (no frequency awareness, as in MHA2MLA)."""
    c, s = expected_rotation(layout, horizon)
    return (1 - c ** 2 - s ** 2) if horizon > 1 else torch.ones_like(c)


def pair_energy(src: SourceAttention, layout: SourceLayout, sigma: torch.Tensor | None, mix=None) -> torch.Tensor:
    """(G, d/2): E|k'_(j,i)|^2 * sum over heads E|q'_(h,j,i)|^2, the pair's score contribution (MHA2MLA's 2-norm
    criterion, squared), in the mixed basis. sigma: (D+1, D+1) input second moment, None -> identity."""
    H, G, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    half = d // 2
    k_energy = row_energy(mixed_key_weights(src, layout, mix).reshape(G * d, -1), sigma).view(G, d)
    q_energy = row_energy(augment(src.w_q, src.b_q), sigma).view(H, d)
    # q'_(h,j,c) = U_c[j, g(h)] q_(h,c), so its energy is U^2 times the source query's.
    u2 = _full_mix(mix, layout)[:, torch.arange(H) // layout.group_size] ** 2  # (G, H, d)
    q_mixed = (u2 * q_energy[None]).sum(1)  # (G, d)
    pairs = lambda e: e[..., :half] + e[..., half:]  # noqa: E731
    return pairs(k_energy) * pairs(q_mixed)


def row_energy(w: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """(m,): E[(w_m x)^2] for augmented rows w (m, D+1)."""
    if sigma is None:
        return (w ** 2).sum(-1)
    return ((w @ sigma) * w).sum(-1)


def augment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """w (m, D), b (m,) -> [w, b] (m, D+1) in fp64: biases ride on the constant input 1."""
    b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b
    return torch.cat((w, b[:, None]), 1).double()


def _full_mix(mix: torch.Tensor | None, layout: SourceLayout) -> torch.Tensor:
    """(G, G, d): U_i repeated on both components of each pair."""
    G = layout.num_kv_heads
    if mix is None:
        return torch.eye(G, dtype=torch.float64)[:, :, None].expand(G, G, layout.head_dim)
    return torch.cat((mix, mix), -1).double()


def mixed_key_weights(src: SourceAttention, layout: SourceLayout, mix) -> torch.Tensor:
    """Augmented key weights in k' space: (G, d, D+1)."""
    G, d = layout.num_kv_heads, layout.head_dim
    wk = augment(src.w_k, src.b_k).view(G, d, -1)
    return torch.einsum("jgc,gcD->jcD", _full_mix(mix, layout), wk)


def mixed_query_weights(src: SourceAttention, layout: SourceLayout, mix) -> torch.Tensor:
    """Augmented query weights of every head in k' space: (H, G, d, D+1); zero outside its group if R = I."""
    H, d = layout.num_heads, layout.head_dim
    wq = augment(src.w_q, src.b_q).view(H, d, -1)
    u = _full_mix(mix, layout)[:, torch.arange(H) // layout.group_size]  # (G, H, d): column g(h) of each U_i
    return u.permute(1, 0, 2)[..., None] * wq[:, None]


@dataclass(frozen=True)
class HighFrequencies:
    """MHA2MLA's S_high: keep the fastest-rotating pairs (i = 0 first) of every KV head. Exportable
    only with one KV head (a repeated frequency has no DeepSeek-V3 form)."""

    name = "high"

    def split(self, src, layout: SourceLayout, pairs: int, sigma=None, horizon: int = 0) -> KeySplit:
        G = layout.num_kv_heads
        if pairs % G:
            raise ValueError(f"S_high keeps pairs uniformly: {pairs} pairs is not a multiple of {G} KV heads")
        return KeySplit(tuple((g, i) for g in range(G) for i in range(pairs // G)))


@dataclass(frozen=True)
class TwoNorm:
    """MHA2MLA's S_2-norm: keep the pairs with the largest E|q| E|k| on calibration data (weights
    alone without it), times the score share a pair loses when it stops rotating (`horizon`).
    Not exportable in general."""

    name = "2norm"

    def split(self, src, layout: SourceLayout, pairs: int, sigma=None, horizon: int = 0) -> KeySplit:
        e = pair_energy(src, layout, sigma) * drop_cost(layout, horizon)  # (G, d/2)
        top = e.flatten().topk(pairs).indices.sort().values
        half = layout.head_dim // 2
        return KeySplit(tuple((int(t) // half, int(t) % half) for t in top))


@dataclass(frozen=True)
class RoRoPE:
    """TransMLA's RoRoPE: per frequency, PCA of the keys across KV heads (U_i commutes with RoPE),
    then keep the mixed pairs with the largest score contribution (times the share lost without
    rotation over `horizon` tokens, see `drop_cost`). With `exportable=True` it keeps
    component 0 of the `pairs` fastest frequencies, which DeepSeek-V3 can express."""

    name = "rorope"
    exportable: bool = False

    def split(self, src, layout: SourceLayout, pairs: int, sigma=None, horizon: int = 0) -> KeySplit:
        mix = self.rotation(src, layout, sigma)
        if self.exportable:
            return KeySplit(tuple((0, i) for i in range(pairs)), mix)
        e = pair_energy(src, layout, sigma, mix) * drop_cost(layout, horizon)  # (G, d/2)
        top = e.flatten().topk(pairs).indices.sort().values
        half = layout.head_dim // 2
        return KeySplit(tuple((int(t) // half, int(t) % half) for t in top), mix)

    @staticmethod
    def rotation(src, layout: SourceLayout, sigma=None) -> torch.Tensor:
        """(G, G, d/2): rows of U_i = eigenvectors of the frequency-i key second moment, largest first."""
        wk = mixed_key_weights(src, layout, None).transpose(0, 1)  # (d, G, D+1)
        ws = wk @ sigma if sigma is not None else wk
        half = layout.head_dim // 2
        cov = ws @ wk.transpose(1, 2)  # (d, G, G)
        cov = cov[:half] + cov[half:]  # both components of a pair rotate together
        _, vecs = torch.linalg.eigh(cov)  # ascending
        return vecs.flip(-1).transpose(-1, -2).permute(1, 2, 0).contiguous()  # (G, G, d/2)


ROPE_STRATEGIES = {"high": HighFrequencies(), "2norm": TwoNorm(), "rorope": RoRoPE(),
                   "rorope-export": RoRoPE(exportable=True)}
