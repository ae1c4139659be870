"""Pure tensor math of the conversion: source attention weights -> MLA layer weights.

Shapes: H query heads, G KV heads, d head dim, D hidden, p = qk_rope_head_dim, n =
qk_nope_head_dim, r = kv_lora_rank. Weights are "augmented" (m, D+1): the last column is the
bias, acting on a constant input 1, so biases are factorized with everything else.
RoPE pairs use transformers' half-split layout: pair i of a head is dims (i, i + d/2).
"""

from __future__ import annotations

import torch

from .families import SourceAttention, SourceLayout
from .rope import KeySplit, augment, embedded_queries, mix_rows, mixed_key_weights


def split_keys(src: SourceAttention, layout: SourceLayout, split: KeySplit, horizon: int = 0) -> dict:
    """Rotated vs non-rotated rows of the (mixed) keys and queries (notes §2, identically on both).

    Returns augmented weights: kr (p, D+1), q_rope (H, p, D+1), q_nope (H, n, D+1),
    k_nope (Gn, n, D+1) for Gn nope groups, nope_group (H,) the group each head reads, freq_idx (p/2,).
    Nope dims stay per KV group when the split is uniform with R = I (compact), else one shared group.
    With `horizon` > 1 the non-rotated query rows carry the pair's mean rotation (`expected_rotation`).
    """
    H, G, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    half = d // 2
    wk = mixed_key_weights(src, layout, split.mix).reshape(G * d, -1)  # (G*d, D+1) rows of k'
    q0 = embedded_queries(src, layout)  # (H, G, d, D+1), source basis
    wq = mix_rows(split.mix, q0, layout).reshape(H, G * d, -1)  # (H, G*d, D+1)
    first = torch.tensor([j * d + i for j, i in split.kept], dtype=torch.long)
    rope = torch.cat((first, first + half))  # (p,) k' dims of k_pe, rotate_half layout
    if split.uniform(layout):
        nope = split_nope_per_group(layout, split)  # (G, n)
        group = torch.arange(H) // layout.group_size
    else:
        keep = torch.ones(G * d, dtype=torch.bool)
        keep[rope] = False
        nope, group = keep.nonzero()[:, 0][None], torch.zeros(H, dtype=torch.long)  # (1, n)
    # the mean rotation belongs to each source pair's own frequency, so it goes before the mix
    wq_nope = mix_rows(split.mix, mean_rotated(q0.flatten(1, 2), layout, horizon).view_as(q0), layout).flatten(1, 2)
    return dict(kr=wk[rope], q_rope=wq[:, rope], q_nope=wq_nope[torch.arange(H)[:, None], nope[group]],
                k_nope=wk[nope], nope_group=group, freq_idx=torch.tensor([i for _, i in split.kept]))


def mean_rotated(wq: torch.Tensor, layout: SourceLayout, horizon: int) -> torch.Tensor:
    """Query rows (H, G*d, D+1) multiplied by the mean relative rotation M_i = [[C, S], [-S, C]] of
    their pair: score q^T R(-theta t) k ~= (M^T q)^T k for a key that no longer rotates."""
    if horizon <= 1:
        return wq
    from .rope import expected_rotation

    c, s = (t[:, None] for t in expected_rotation(layout, horizon))  # (d/2, 1)
    H, G, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    q = wq.view(H, G, 2, d // 2, -1)
    qa, qb = q[:, :, 0], q[:, :, 1]
    return torch.stack((c * qa - s * qb, s * qa + c * qb), 2).view_as(wq)


def split_nope_per_group(layout: SourceLayout, split: KeySplit) -> torch.Tensor:
    """(G, n) k' dims (head offset included) that lose rotation, per KV group."""
    d, half = layout.head_dim, layout.head_dim // 2
    rows = []
    for g in range(layout.num_kv_heads):
        kept = {i for j, i in split.kept if j == g}
        rows.append([g * d + c for c in range(d) if c % half not in kept])
    return torch.tensor(rows, dtype=torch.long).view(layout.num_kv_heads, -1)


def stack_nope_kv(parts: dict, src: SourceAttention) -> torch.Tensor:
    """Y = [K_nope; V] as one augmented map (Gn*n + G*d, D+1)."""
    return torch.cat((parts["k_nope"].flatten(0, 1), augment(src.w_v, src.b_v)))


def low_rank(w: torch.Tensor, rank: int, stats=None, metric: torch.Tensor | None = None, bias_free: bool = False):
    """min over rank-r B A of E|L (W - B A) x|^2, with E[x x^T] = stats.sigma and L^T L = metric.

    w (m, D+1) -> A (r, D+1), B (m, r). SVD of L W sigma^1/2 gives the latent; then B is the
    least-squares refit given A (it does not depend on L), against the source's inputs when
    `stats.cross` is set. Latent dims come out with unit second moment when stats are given.
    stats/metric None: identity (weight-only SVD). `bias_free`: A's constant column stays 0 (the
    latent gets no bias, as DeepSeek-V3 engines require); needs w without biases.
    """
    if bias_free:
        from .calibrate import InputStats

        inner = None if stats is None else InputStats(
            stats.sigma[:-1, :-1], None if stats.cross is None else stats.cross[:-1, :-1])
        a, b = low_rank(w[:, :-1], rank, inner, metric)
        return torch.cat((a, a.new_zeros(a.shape[0], 1)), 1), b
    (u, s, vh), (s_inv_half, l_inv_half) = _weighted_svd(w, stats, metric)
    a = vh[:rank] @ s_inv_half  # (r, D+1)
    b = l_inv_half @ u[:, :rank] * s[:rank]
    if stats is not None:
        b = refit(w, a, stats.sigma, stats.cross)
    return a, b


def spectrum(w: torch.Tensor, stats=None, metric: torch.Tensor | None = None) -> torch.Tensor:
    """(min(m, D+1),) descending singular values of L W sigma^1/2: keeping rank r leaves error
    sum_{k >= r} s_k^2 in the metric's units, so s^2 is the marginal error of each latent dim."""
    return _weighted_svd(w, stats, metric)[0][1]


def _weighted_svd(w: torch.Tensor, stats, metric):
    """-> ((U, S, Vh) of L W sigma^1/2, (sigma^-1/2, L^-1))."""
    m, n = w.shape
    s_half, s_inv_half = stats.roots if stats is not None else sqrt_and_inverse(None, n)
    l_half, l_inv_half = sqrt_and_inverse(metric, m)
    return torch.linalg.svd(l_half @ w @ s_half, full_matrices=False), (s_inv_half, l_inv_half)


def refit(w: torch.Tensor, a: torch.Tensor, sigma: torch.Tensor, cross: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares up-projection: argmin_B E|W x_src - B A x|^2 = W C A^T (A sigma A^T)^-1,
    with C = E[x_src x^T] (`cross`; = sigma when the inputs are the source's own)."""
    c = sigma if cross is None else cross
    gram = a @ sigma @ a.T
    gram = gram + 1e-10 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, (w @ c @ a.T).T).T


def sqrt_and_inverse(mat: torch.Tensor | None, n: int):
    """Symmetric square root and its (damped) inverse of a PSD matrix; identity for None."""
    if mat is None:
        eye = torch.eye(n, dtype=torch.float64)
        return eye, eye
    vals, vecs = torch.linalg.eigh(mat.double())
    vals = vals.clamp(min=0) + 1e-8 * vals.clamp(min=0).max() + 1e-30
    return (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T


def assemble(layout: SourceLayout, src: SourceAttention, parts: dict, a: torch.Tensor, b: torch.Tensor) -> dict:
    """MLAAttention state dict (fp32) from the key split and the latent factors A (r, D+1), B (m, r).

    kv_b_proj rows per head h: [W_uk of its nope group (n, r); W_uv of its KV group (d, r)].
    """
    H, G, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    gn, n = parts["k_nope"].shape[:2]
    r = b.shape[1]
    g_of_h = torch.arange(H) // layout.group_size
    w_uk = b[: gn * n].view(gn, n, r)[parts["nope_group"]]  # (H, n, r)
    w_uv = b[gn * n:].view(G, d, r)[g_of_h]  # (H, d, r)
    q = torch.cat((parts["q_nope"], parts["q_rope"]), 1).flatten(0, 1)  # (H*(n+p), D+1)
    kv_a = torch.cat((a, parts["kr"]))  # (r+p, D+1)
    sd = {"q_proj.weight": q[:, :-1], "kv_a_proj_with_mqa.weight": kv_a[:, :-1],
          "kv_b_proj.weight": torch.cat((w_uk, w_uv), 1).flatten(0, 1), "o_proj.weight": src.w_o}
    if src.b_q is not None:
        sd["q_proj.bias"] = q[:, -1]
    if kv_a[:, -1].abs().max() > 0:
        sd["kv_a_proj_with_mqa.bias"] = kv_a[:, -1]
    if src.b_o is not None:
        sd["o_proj.bias"] = src.b_o
    sd = {k: v.float().clone() for k, v in sd.items()}
    sd["rope_freq_idx"] = parts["freq_idx"].clone()
    return sd
