"""The weighted low-rank problem of the latent, as pure linear algebra on fp64 tensors.

min over rank-r B A of E|L (W - B A) x|^2: L^T L weighs the rows of W (a metric from
`conversion.metrics`), E[x x^T] = sigma the inputs (`conversion.statistics.InputStats`).
"""

from __future__ import annotations

import torch


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
        inner = None if stats is None else stats.without_constant()
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
    square roots cost an eigendecomposition and two products per layer)."""
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
    times faster than LAPACK's SVD on 7B/8B layer problems (BENCHMARKS.md, "design notes"); singular values below ~1e-8 x the largest lose
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
