"""Pure tensor math of the conversion: source attention weights -> MLA layer weights.

Shapes: H query heads, G KV heads, d head dim, D hidden, p = qk_rope_head_dim, n =
qk_nope_head_dim, r = kv_lora_rank. Weights are "augmented" (m, D+1): the last column is the
bias, acting on a constant input 1, so biases are factorized with everything else.
RoPE pairs use transformers' half-split layout: pair i of a head is dims (i, i + d/2).
"""

from __future__ import annotations

import torch

from .families import SourceAttention, SourceLayout
from .rope import KeySplit, augment, mixed_key_weights


def split_keys(src: SourceAttention, layout: SourceLayout, split: KeySplit, horizon: int = 0) -> dict:
    """Rotated vs non-rotated rows of the (mixed) keys and queries (notes §2, identically on both).

    Returns augmented weights: kr (p, D+1), q_rope (H, p, D+1), k_nope (Gn, n, D+1) for Gn nope
    groups, nope_group (H,) the group each head reads, freq_idx (p/2,), and the non-rotated queries
    factored as q_map (H, n, k) @ q_nope (H, k, D+1) (`nope_queries`). When n > d (one shared group:
    RoRoPE mixes every KV head's dims, so each query head reads all G*d - p of them) q_nope keeps the
    head's own d source rows and q_map the linear map to k' space, so the MLA query needs only d
    non-rotated dims per head (the map moves into W_uk): at Llama-3-8B, q_proj is 2.5x the source's
    instead of 8x. Otherwise q_map is None and q_nope is already in k' space (k = n).
    Nope dims stay per KV group when the split is uniform with R = I (compact), else one shared group.
    With `horizon` > 1 the non-rotated query rows carry the pair's mean rotation (`expected_rotation`).
    """
    H, G, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    half = d // 2
    wk = mixed_key_weights(src, layout, split.mix).reshape(G * d, -1)  # (G*d, D+1) rows of k'
    first = torch.tensor([j * d + i for j, i in split.kept], dtype=torch.long)
    rope = torch.cat((first, first + half))  # (p,) k' dims of k_pe, rotate_half layout
    if split.uniform(layout):
        nope = split_nope_per_group(layout, split)  # (G, n)
        group = torch.arange(H) // layout.group_size
    else:
        keep = torch.ones(G * d, dtype=torch.bool)
        keep[rope] = False
        nope, group = keep.nonzero()[:, 0][None], torch.zeros(H, dtype=torch.long)  # (1, n)
    # One head at a time: a head's query lives in its own KV group's slot of k' space (zero elsewhere
    # before the mix), and holding all H x G slots at once costs H*G*d*(D+1) fp64 (1 GiB at 8B).
    wq_all = augment(src.w_q, src.b_q).view(H, d, -1)  # (H, d, D+1), source basis
    eye = torch.eye(d, dtype=wk.dtype)
    q_rope = wk.new_empty(H, len(rope), wk.shape[1])
    q_map = wk.new_empty(H, nope.shape[1], d)
    for h in range(H):
        g = h // layout.group_size
        q_rope[h] = head_query(wq_all[h], g, split.mix, layout, rope)
        # the mean rotation belongs to each source pair's own frequency, so it goes before the mix
        q_map[h] = head_query(mean_rotated(eye, layout, horizon), g, split.mix, layout, nope[group[h]])
    parts = dict(kr=wk[rope], q_rope=q_rope, k_nope=wk[nope], nope_group=group,
                 freq_idx=torch.tensor([i for _, i in split.kept]))
    if nope.shape[1] > d:  # a shared nope group (RoRoPE): keep the head's d source rows and the map
        parts.update(q_nope=wq_all, q_map=q_map)
    else:
        parts.update(q_nope=q_map @ wq_all, q_map=None)
    return parts


def nope_queries(parts: dict) -> torch.Tensor:
    """The non-rotated query rows each head reads, in k' space: (H, n, D+1) (memory: H*n*(D+1))."""
    return parts["q_nope"] if parts["q_map"] is None else parts["q_map"] @ parts["q_nope"]


def head_query(q: torch.Tensor, g: int, mix: torch.Tensor | None, layout: SourceLayout,
               rows: torch.Tensor) -> torch.Tensor:
    """One head's augmented query rows q (d, D+1), read against KV group g -> its k'-space rows
    `rows` (R,) of the (G*d, D+1) whole: only group g's columns of the mix touch it (what `mix_rows`
    does to a zero-padded slot), and only the rows asked for are computed (all G*d of them cost
    2 GFLOP per head at Llama-2-7B's 32 KV heads)."""
    G, d = layout.num_kv_heads, layout.head_dim
    half, n = d // 2, q.shape[-1]
    if mix is None:  # the head's own slot, zero in every other group's
        own = rows // d == g
        out = q.new_zeros(len(rows), n)
        out[own] = q[rows[own] % d]
        return out
    x = q.view(2, half, n)  # pair halves a = 0, 1
    sub = mix[:, g * half:(g + 1) * half].to(q.dtype)  # (G*half, half): mixed channel <- group g's pairs
    side, chan = (rows % d) // half, (rows // d) * half + rows % half  # k' row -> (half, mixed channel)
    out = q.new_empty(len(rows), n)
    for a in (0, 1):
        sel = side == a
        out[sel] = sub[chan[sel]] @ x[a]
    return out


def mean_rotated(q: torch.Tensor, layout: SourceLayout, horizon: int) -> torch.Tensor:
    """One head's query rows (d, D+1) multiplied by the mean relative rotation M_i = [[C, S], [-S, C]]
    of their pair: score q^T R(-theta t) k ~= (M^T q)^T k for a key that no longer rotates."""
    if horizon <= 1:
        return q
    from .rope import expected_rotation

    c, s = (t[:, None] for t in expected_rotation(layout, horizon))  # (d/2, 1)
    qa, qb = q.view(2, layout.head_dim // 2, -1)
    return torch.cat((c * qa - s * qb, s * qa + c * qb))


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
    """min over rank-r B A of E|L (W - B A) x|^2, with E[x x^T] = stats.sigma and L^T L = metric
    (an (m, m) matrix, or a list of square blocks of a block-diagonal one).

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
    (u, s, vh), (from_right, from_left) = _weighted_svd(w, stats, metric, rank)
    a = from_right(vh[:rank])  # (r, D+1)
    b = from_left(u[:, :rank] * s[:rank])
    if stats is not None:
        b = refit(w, a, stats.sigma, stats.cross)
    return a, b


def spectrum(w: torch.Tensor, stats=None, metric: torch.Tensor | None = None) -> torch.Tensor:
    """(min(m, D+1),) descending singular values of L W R (L^T L = metric, R R^T = sigma): keeping
    rank r leaves error sum_{k >= r} s_k^2 in the metric's units, the marginal error of each latent dim."""
    return _weighted_svd(w, stats, metric)[0][1]


def _weighted_svd(w: torch.Tensor, stats, metric, rank: int | None = None):
    """-> ((U, S, Vh) of L W R, (rows -> rows R^-1, cols -> L^-1 cols)).

    min |L (W - B A) R|_F over rank r is reached by any square-root factors: L = C^T and R from
    Cholesky factors of the metric and of sigma (a third of one (D+1)^3 product, where symmetric
    square roots cost an eigendecomposition and two products: minutes per layer at D = 4096)."""
    lw, from_left = w, (lambda cols: cols)
    if metric is not None:
        # a block-diagonal metric (list of square blocks) is factored and applied block by block:
        # at Llama-2-7B's MHA a dense (7424, 7424) factor times W is 450 GFLOP, the blocks 95
        blocks = [m for m in ([metric] if isinstance(metric, torch.Tensor) else metric) if m.numel()]
        top = max(float(m.diagonal().abs().max()) for m in blocks)
        cs = [psd_factor(m, top) for m in blocks]  # lower, C C^T = block (damped as one matrix)
        cuts = [0, *torch.tensor([c.shape[0] for c in cs]).cumsum(0).tolist()]
        lw = torch.cat([c.T @ w[i:j] for c, i, j in zip(cs, cuts, cuts[1:])])

        def from_left(cols):
            return torch.cat([torch.linalg.solve_triangular(c.T, cols[i:j], upper=True)
                              for c, i, j in zip(cs, cuts, cuts[1:])])
    if stats is None:
        return thin_svd(lw, rank), (lambda rows: rows, from_left)
    r = stats.factor  # (D+1, D+1) lower, R R^T = sigma
    from_right = lambda rows: torch.linalg.solve_triangular(r, rows, upper=False, left=False)  # noqa: E731
    return thin_svd(lw @ r, rank), (from_right, from_left)


GRAM_SVD_ELEMENTS = 2**22  # above this (7B/8B layers), a wide matrix's SVD goes through its Gram matrix


def thin_svd(m: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of an fp64 (a, b) matrix; with `rank`, U and Vh hold only the leading `rank`
    vectors (S stays whole). A large one is taken through eigh of its smaller Gram matrix, several
    times faster than LAPACK's SVD at (1856, 4097); singular values below ~1e-8 x the largest lose
    relative accuracy that way, which only the spectrum's tail shows."""
    a, b = m.shape
    if a * b < GRAM_SVD_ELEMENTS:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s, vh[:rank]
    if a > b:  # tall: the SVD of the transpose, transposed back
        v, s, uh = thin_svd(m.T, rank)
        return uh.T, s, v.T
    vals, u = torch.linalg.eigh(m @ m.T)
    vals, u = vals.flip(0).clamp(min=0), u.flip(1)[:, :rank]
    s = vals.sqrt()
    vh = (u.T @ m) / s[: u.shape[1]].clamp(min=s[0] * 1e-150 + 1e-300)[:, None]
    return u, s, vh


def refit(w: torch.Tensor, a: torch.Tensor, sigma: torch.Tensor, cross: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares up-projection: argmin_B E|W x_src - B A x|^2 = W C A^T (A sigma A^T)^-1,
    with C = E[x_src x^T] (`cross`; = sigma when the inputs are the source's own)."""
    c = sigma if cross is None else cross
    gram = a @ sigma @ a.T
    gram = gram + 1e-10 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, (w @ c @ a.T).T).T


def psd_factor(mat: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Lower-triangular R (fp64) with R R^T = mat + damping; the damping (1e-8 x the largest diagonal
    entry, or x `scale` for a block of a larger matrix, raised until Cholesky succeeds) keeps
    directions the calibration never saw finite."""
    damp = 1e-8 * (float(mat.diagonal().abs().max()) if scale is None else scale) + 1e-30
    for _ in range(12):
        damped = mat.double().clone()
        damped.diagonal().add_(damp)
        r, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return r
        damp *= 100
    raise ValueError("second-moment matrix is not positive semi-definite (NaN in the statistics?)")


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
    if parts["q_map"] is not None:  # (M q_src) . (W_uk c) = q_src . (M^T W_uk c): d nope dims per head
        w_uk = parts["q_map"].transpose(1, 2) @ w_uk  # (H, d, r)
        n = d
    # q_proj is written straight into its final fp32 tensor: a copy of it is the largest transient
    # of a streaming conversion at 7B/8B
    q_nope, q_rope = parts["q_nope"], parts["q_rope"]  # (H, n, D+1), (H, p, D+1)
    q = q_nope.new_empty(H, n + q_rope.shape[1], q_nope.shape[-1] - 1, dtype=torch.float32)
    q[:, :n], q[:, n:] = q_nope[..., :-1], q_rope[..., :-1]
    kv_a = torch.cat((a, parts["kr"]))  # (r+p, D+1)
    sd = {"kv_a_proj_with_mqa.weight": kv_a[:, :-1],
          "kv_b_proj.weight": torch.cat((w_uk, w_uv), 1).flatten(0, 1), "o_proj.weight": src.w_o}
    if src.b_q is not None:
        sd["q_proj.bias"] = torch.cat((q_nope[..., -1], q_rope[..., -1]), 1).flatten()
    if kv_a[:, -1].abs().max() > 0:
        sd["kv_a_proj_with_mqa.bias"] = kv_a[:, -1]
    if src.b_o is not None:
        sd["o_proj.bias"] = src.b_o
    sd = {k: v.to(torch.float32, copy=True) for k, v in sd.items()}  # own memory, one copy each
    sd["q_proj.weight"] = q.flatten(0, 1)  # (H*(n+p), D)
    sd["rope_freq_idx"] = parts["freq_idx"].clone()
    return sd
