"""The RoPE side: which key dims keep their rotation, as strategies returning a `KeySplit`.

Keys are first mixed by an orthogonal `P` that (nearly) commutes with RoPE. P acts on pair
channels c = g * d/2 + i (KV head g, frequency i), identically on both components of a pair:
k'_c = sum_c' P[c, c'] k_c'. Mixing only channels of one frequency across KV heads commutes with
RoPE exactly (TransMLA's RoRoPE); frequency folding also mixes neighbouring frequencies and then
rotates each mixed channel at one of them (an approximation). Channel (j, i) of k' is slot j at
frequency i; kept channels form the shared rotated key `k_pe`; every other dim of k' is
non-rotated ("nope") on queries and keys alike. Queries are mixed by the same P, so
scores are unchanged when nothing is dropped and nothing is folded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LatentKVError
from ..families import SourceAttention, SourceLayout


@dataclass(frozen=True)
class KeySplit:
    """kept: (j, i) channels in k_pe order; mix: (C, C) pair-channel mix P, or None for P = I."""

    kept: tuple[tuple[int, int], ...]
    mix: torch.Tensor | None = None

    def uniform(self, layout: SourceLayout) -> bool:
        """Every KV head keeps the same number of pairs and P = I: nope dims can stay per group."""
        counts = [sum(1 for j, _ in self.kept if j == g) for g in range(layout.num_kv_heads)]
        return self.mix is None and len(set(counts)) == 1

    def exportable(self) -> bool:
        """DeepSeek-V3 rotates its p rope dims at one schedule of two runs (YaRN with beta_fast = beta_slow
        puts the step between them, `deepseek.layout.rope_parameters`): slot 0 of frequencies 0..a-1, then
        either slot 1 of frequencies 0..c-1, c <= a (factor < 1) or slot 0 of a+s..m-1+s (factor > 1)."""
        run = frequency_runs([i for _, i in self.kept])
        return run is not None and self.kept == export_kept(len(self.kept), run[0], max(run[1], 0))


def frequency_runs(freqs: list[int]) -> tuple[int, int] | None:
    """(a, shift) of the source frequency indices of rope pairs in order (ours and the engine's agree):
    0..a-1, then pair j >= a at frequency j + shift, where shift is -a (second components of 0..m-a-1,
    m - a <= a) or s > 0 (s frequencies skipped); (m, 0) for one run, (0, 0) for none; None for anything
    no DeepSeek-V3 schedule runs."""
    m = len(freqs)
    if m == 0 or freqs[0] != 0:
        return (0, 0) if m == 0 else None
    a = next((k for k in range(1, m) if freqs[k] != freqs[k - 1] + 1), m)
    shift = freqs[a] - a if a < m else 0
    fits = a == m or shift > 0 or (shift == -a and m - a <= a)
    return (a, shift) if fits and freqs[a:] == [j + shift for j in range(a, m)] else None


def export_kept(pairs: int, slot0: int, skip: int = 0) -> tuple[tuple[int, int], ...]:
    """The channels an exportable split keeps, in rope-pair order: slot 0 of the `slot0` fastest
    frequencies, then for the other `pairs - slot0` either (skip 0) slot 1, the second RoRoPE component
    across KV heads, of the fastest frequencies, or (skip s > 0) slot 0 of the frequencies after s skipped."""
    if skip:
        return tuple((0, i) for i in range(slot0)) + tuple((0, i + skip) for i in range(slot0, pairs))
    return tuple((0, i) for i in range(slot0)) + tuple((1, i) for i in range(pairs - slot0))


def slot0_choices(layout: SourceLayout, pairs: int) -> range:
    """Valid `slot0` for `pairs` exportable pairs with skip 0: slot 1 needs a second KV head and stays within slot 0."""
    half = layout.head_dim // 2
    if layout.num_kv_heads == 1:
        return range(pairs, pairs + 1) if pairs <= half else range(0)
    return range(max((pairs + 1) // 2, pairs - half), min(pairs, half) + 1)


def schedules(layout: SourceLayout, pairs: int, most: int | None = None, skip: bool = False) -> list[tuple[int, int]]:
    """Exportable (slot0, skip) for `pairs` rope pairs whose frequencies stay below `most` (a source's plain,
    unscaled frequencies; None: all): the second components' runs, and with `skip` the skipping ones too."""
    top = layout.head_dim // 2 if most is None else min(most, layout.head_dim // 2)
    dup = [(a, 0) for a in slot0_choices(layout, pairs) if a <= top]
    return dup + ([(a, s) for a in range(1, pairs) for s in range(1, top - pairs + 1)] if skip else [])


def check_skip(layout: SourceLayout, pairs: int, slot0: int | None, skip: int) -> None:
    """One-line error unless `slot0` first pairs, then `skip` frequencies skipped, fit the source's."""
    top = layout.head_dim // 2 - pairs
    if slot0 is None or not 1 <= slot0 < pairs or not 1 <= skip <= top:
        fix = (f"give --rope-slot0 from 1 to {pairs - 1} and --rope-skip from 1 to {top}" if top > 0 and pairs > 1
               else "no frequency is left to skip; drop --rope-skip")
        raise LatentKVError(f"--rope-skip {skip} does not fit {pairs} rope pairs of {layout.head_dim // 2} "
                            f"frequencies with --rope-slot0 {slot0}: {fix}")


def best_schedule(energies: list[torch.Tensor], layout: SourceLayout, pairs: int,
                  most: int | None = None, skip: bool = False) -> tuple[int, int]:
    """The exportable (slot0, skip) that keeps the most score energy summed over layers (each layer's
    (G, d/2) energy normalised to 1, so every layer counts alike): one schedule serves every layer.
    `most`: keep to the source's `most` plain frequencies; none fits: first components only. `skip`: also
    weigh skipping schedules, which energy overrates (measured: `search.export_schedule`)."""
    total = sum(e / e.sum() for e in energies)  # (G, d/2)

    def kept(choice: tuple[int, int]) -> float:
        return float(sum(total[j, i] for j, i in export_kept(pairs, *choice)))

    choices = schedules(layout, pairs, most, skip)
    return max(choices, key=kept) if choices else (max(slot0_choices(layout, pairs), default=pairs), 0)


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
    """(G, d/2): E|k'_(j,i)|^2 * sum over heads E|q'_(h,j,i)|^2, the channel's score contribution
    (MHA2MLA's 2-norm criterion, squared), in the mixed basis. sigma: (D+1, D+1) input second
    moment, None -> identity."""
    H, G, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    half, C = d // 2, G * d // 2
    k_energy = row_energy(mixed_key_weights(src, layout, mix).reshape(G * d, -1), sigma).view(G, 2, half).sum(1)
    wq = augment(src.w_q, src.b_q).view(H, d, -1)
    gram = (wq @ sigma if sigma is not None else wq) @ wq.transpose(1, 2)  # (H, d, d)
    p = torch.eye(C, dtype=torch.float64) if mix is None else mix.double()
    m = p.view(C, G, half)[:, torch.arange(H) // layout.group_size].transpose(0, 1)  # (H, C, half) reads q_h
    q_energy = sum(torch.einsum("hci,hij,hcj->c", m, gram[:, a * half:(a + 1) * half, a * half:(a + 1) * half], m)
                   for a in (0, 1))
    return k_energy * q_energy.view(G, half)


def row_energy(w: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """(m,): E[(w_m x)^2] for augmented rows w (m, D+1)."""
    if sigma is None:
        return (w ** 2).sum(-1)
    return ((w @ sigma) * w).sum(-1)


def augment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """w (m, D), b (m,) -> [w, b] (m, D+1) in fp64: biases ride on the constant input 1."""
    b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b
    return torch.cat((w, b[:, None]), 1).double()


def mix_rows(mix: torch.Tensor | None, w: torch.Tensor, layout: SourceLayout) -> torch.Tensor:
    """Apply P (C, C) to rows laid out per KV head, w (..., G, d, n) -> (..., G, d, n)."""
    if mix is None:
        return w
    G, d = layout.num_kv_heads, layout.head_dim
    lead, n = w.shape[:-3], w.shape[-1]
    x = w.reshape(*lead, G, 2, d // 2, n).transpose(-4, -3).reshape(*lead, 2, G * d // 2, n)
    x = torch.einsum("ck,...akn->...acn", mix.to(w.dtype), x)
    return x.reshape(*lead, 2, G, d // 2, n).transpose(-4, -3).reshape(*lead, G, d, n)


def mixed_key_weights(src: SourceAttention, layout: SourceLayout, mix) -> torch.Tensor:
    """Augmented key weights in k' space: (G, d, D+1)."""
    G, d = layout.num_kv_heads, layout.head_dim
    return mix_rows(mix, augment(src.w_k, src.b_k).view(G, d, -1), layout)


@dataclass(frozen=True)
class PerHeadPairs:
    """MHA2MLA's per-head strategies, the same pairs in every KV head: S_high keeps the fastest-rotating
    pairs (i = 0 first), S_low the slowest, S_uniform pairs spread evenly over the spectrum (i = 0, s,
    2s, ... with s = d/2 / kept). Exportable only as S_high with one KV head (a repeated frequency has
    no DeepSeek-V3 form)."""

    which: str = "high"

    @property
    def name(self) -> str:
        return self.which

    def split(self, src, layout: SourceLayout, pairs: int, sigma=None, horizon: int = 0) -> KeySplit:
        G, half = layout.num_kv_heads, layout.head_dim // 2
        if pairs % G:
            raise ValueError(f"S_{self.which} keeps pairs uniformly: {pairs} pairs is not a multiple of {G} KV heads")
        n = pairs // G
        kept = {"high": range(n), "low": range(half - n, half),
                "uniform": sorted({int(k * half / n) for k in range(n)}) if n else []}[self.which]
        return KeySplit(tuple((g, i) for g in range(G) for i in kept))


@dataclass(frozen=True)
class HighFrequencies(PerHeadPairs):
    """S_high (see PerHeadPairs): what the exact and weight-SVD conversions rotate."""

    which: str = "high"


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
    """TransMLA's RoRoPE: per frequency, PCA of the keys across KV heads (it commutes with RoPE),
    then keep the mixed channels with the largest score contribution (times the share lost without
    rotation over `horizon` tokens, see `drop_cost`). With `fold` > 1 (frequency folding) the PCA
    runs over `fold` neighbouring frequencies at once, so fewer channels carry more energy; each
    component then rotates at the member frequency holding most of its weight, which is exact only
    for fold 1. With `exportable=True` it keeps slot 0 of the `pairs` fastest frequencies, which
    DeepSeek-V3 can express."""

    name = "rorope"
    exportable: bool = False
    fold: int = 1

    def split(self, src, layout: SourceLayout, pairs: int, sigma=None, horizon: int = 0,
              slot0: int | None = None, skip: int = 0) -> KeySplit:
        """`slot0`, `skip` (exportable only, see `export_kept`): the schedule; slot0 None: first components
        only, as many as fit (the caller that sees every layer picks both by energy: `search.export_schedule`)."""
        every = pairs >= layout.num_kv_heads * layout.head_dim // 2
        mix = self.rotation(src, layout, sigma, 1 if every else self.fold)  # nothing dropped: no need to fold
        if self.exportable:
            choices = slot0_choices(layout, pairs)
            slot0 = (choices[-1] if choices else pairs) if slot0 is None else slot0  # default: first components only
            if skip:
                check_skip(layout, pairs, slot0, skip)
            elif slot0 not in choices:
                raise LatentKVError(f"--rope-slot0 {slot0} does not fit {pairs} rope pairs on this model: choose "
                                    + (f"from {choices.start} to {choices.stop - 1}" if choices else "fewer rope dims"))
            return KeySplit(export_kept(pairs, slot0, skip), mix)
        e = self.energy(src, layout, sigma, horizon, mix)
        top = e.flatten().topk(pairs).indices.sort().values
        half = layout.head_dim // 2
        return KeySplit(tuple((int(t) // half, int(t) % half) for t in top), mix)

    def energy(self, src, layout: SourceLayout, sigma=None, horizon: int = 0, mix=None) -> torch.Tensor:
        """(G, d/2): each mixed channel's score contribution times the share it loses without rotation."""
        mix = self.rotation(src, layout, sigma, self.fold) if mix is None else mix
        return pair_energy(src, layout, sigma, mix) * drop_cost(layout, horizon)

    @staticmethod
    def rotation(src, layout: SourceLayout, sigma=None, fold: int = 1) -> torch.Tensor:
        """(C, C) orthogonal P: per band of `fold` frequencies, the eigenvectors of the keys' channel
        second moment (both pair components together), largest first, each placed at a slot of
        the frequency where it has most weight."""
        G, half = layout.num_kv_heads, layout.head_dim // 2
        wk = augment(src.w_k, src.b_k).view(G, 2, half, -1).transpose(0, 1).reshape(2, G * half, -1)
        cov = sum((w @ sigma if sigma is not None else w) @ w.T for w in wk)  # (C, C)
        mix = torch.zeros_like(cov)
        for start in range(0, half, fold):
            freqs = list(range(start, min(start + fold, half)))
            chans = torch.tensor([g * half + i for g in range(G) for i in freqs])
            _, vecs = torch.linalg.eigh(cov[chans][:, chans])
            vecs = vecs.flip(-1)  # (G*f, G*f) columns largest first
            weight = (vecs ** 2).view(G, len(freqs), -1).sum(0)  # (f, G*f): a component's weight per frequency
            used = dict.fromkeys(freqs, 0)
            for t in range(vecs.shape[1]):
                free = [k for k, i in enumerate(freqs) if used[i] < G]
                i = freqs[max(free, key=lambda k: float(weight[k, t]))]
                mix[used[i] * half + i, chans] = vecs[:, t]
                used[i] += 1
        return mix


@dataclass(frozen=True)
class RoPElite:
    """EliteKV's RoPElite: per KV head, greedily add the pair whose rotation most reduces the attention-
    output error on calibration inputs, every other pair scored without rotation (with its mean rotation
    over `horizon`, as the conversion then builds it); the same number of pairs in every KV head. The
    greedy order for n pairs starts the one for n + 1, so it is kept in the layer's `memo` and the split
    search extends it instead of starting over. Needs `sample` (InputStats.sample). Not exportable."""

    name = "elite"
    sample_windows: int = 5  # one window of each calibration mixture component (mixture._arrange order)
    query_stride: int = 8  # every 8th query position is scored: the (pairs, n, h, T/8, T) scores are the cost

    def split(self, src, layout: SourceLayout, pairs: int, sigma=None, horizon: int = 0, sample=None,
              memo: dict | None = None) -> KeySplit:
        G = layout.num_kv_heads
        if pairs % G:
            raise ValueError(f"RoPElite keeps pairs uniformly: {pairs} pairs is not a multiple of {G} KV heads")
        if sample is None:
            raise LatentKVError("--rope elite scores pairs on calibration activations, which this conversion did "
                                "not keep; use --method lowrank (calibrated) with the default one-shot statistics")
        n, memo = pairs // G, {} if memo is None else memo
        orders = [memo.setdefault(("elite", g, horizon), []) for g in range(G)]
        if any(len(o) < n for o in orders):
            q, k, v = head_activations(src, layout, sample)  # (S, H, T, d), (S, G, T, d), (S, G, T, d)
            for g, order in enumerate(orders):
                heads = slice(g * layout.group_size, (g + 1) * layout.group_size)
                greedy_pairs(order, n, q[:, heads], k[:, g], v[:, g], layout, horizon, src.softmax_scale,
                             self.query_stride)
        return KeySplit(tuple((g, i) for g, order in enumerate(orders) for i in sorted(order[:n])))


PER_HEAD = ("high", "low", "uniform", "elite")  # strategies that keep the same pairs in every KV head
ROPE_STRATEGIES = {"high": HighFrequencies(), "low": PerHeadPairs("low"), "uniform": PerHeadPairs("uniform"),
                   "2norm": TwoNorm(), "rorope": RoRoPE(), "elite": RoPElite(),
                   "rorope-export": RoRoPE(exportable=True), "rorope-fold2": RoRoPE(fold=2),
                   "rorope-fold4": RoRoPE(fold=4)}


def sample_windows(*ropes: str) -> int:
    """Calibration windows of layer inputs the given strategies score on (0: moments suffice)."""
    return max((getattr(ROPE_STRATEGIES[r], "sample_windows", 0) for r in ropes if r in ROPE_STRATEGIES), default=0)


def head_activations(src: SourceAttention, layout: SourceLayout, x: torch.Tensor):
    """x (S, T, D) attention inputs -> q (S, H, T, d), k and v (S, G, T, d) in fp32, unrotated; with
    QK-norm the per-token 1/rms of the raw projections applied (the folded weights hold the norm weight)."""
    def heads(w, b, count, norm=None):
        y = x @ w.float().T + (0 if b is None else b.float())  # (S, T, count*d)
        if norm is not None:
            raw = x @ norm[0].float().T + (0 if norm[1] is None else norm[1].float())
            raw = raw.view(*raw.shape[:2], count, -1) if src.qk_norm.mode == "head" else raw[..., None, :]
            scale = raw.pow(2).mean(-1).add(src.qk_norm.eps).rsqrt()  # (S, T, count | 1)
            y = (y.view(*y.shape[:2], count, -1) * scale[..., None]).flatten(2)
        return y.view(*y.shape[:2], count, -1).transpose(1, 2)

    qk = src.qk_norm
    x = x.float()
    H, G = layout.num_heads, layout.num_kv_heads
    return (heads(src.w_q, src.b_q, H, qk and (qk.w_q, qk.b_q)), heads(src.w_k, src.b_k, G, qk and (qk.w_k, qk.b_k)),
            heads(src.w_v, src.b_v, G))


def pair_scores(q: torch.Tensor, k: torch.Tensor, layout: SourceLayout, horizon: int, rows: torch.Tensor):
    """Each pair's score term with and without rotation: q (S, h, T, d), k (S, T, d), query positions
    `rows` (Tq,) -> (rotated, unrotated), each (d/2, S, h, Tq, T); unrotated = mean-rotated query
    against the plain key, as `keys.mean_rotated` builds it."""
    half, T = layout.head_dim // 2, k.shape[1]
    angle = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor(layout.inv_freq, dtype=torch.float64)
    cos, sin = angle.cos().float(), angle.sin().float()  # (T, d/2)
    c, s = (t.float() for t in expected_rotation(layout, horizon))  # (d/2,)
    qa, qb, ka, kb = q[..., :half], q[..., half:], k[..., :half], k[..., half:]
    rq = (qa * cos - qb * sin)[:, :, rows], (qb * cos + qa * sin)[:, :, rows]
    rk = ka * cos - kb * sin, kb * cos + ka * sin
    mq = (c * qa - s * qb)[:, :, rows], (s * qa + c * qb)[:, :, rows]

    def terms(qs, ks):
        return sum(torch.einsum("shti,sui->ishtu", a, b) for a, b in zip(qs, ks))

    return terms(rq, rk), terms(mq, (ka, kb))


def greedy_pairs(order: list, n: int, q, k, v, layout: SourceLayout, horizon: int, scale: float, stride: int,
                 chunk: int = 8) -> None:
    """Extend `order` (pairs already chosen, in order) to n pairs of one KV head: each step adds the pair
    whose rotation gives the least squared attention-output error summed over the group's query heads.
    q (S, h, T, d); k, v (S, T, d)."""
    T = k.shape[1]
    rows = torch.arange(stride - 1, T, stride)
    rot, flat = pair_scores(q, k, layout, horizon, rows)
    delta, target = rot - flat, rot.sum(0)  # (d/2, S, h, Tq, T), (S, h, Tq, T)
    del rot
    hidden = ~(rows[:, None] >= torch.arange(T)[None])  # (Tq, T) future keys

    def out(scores):
        return torch.softmax((scores * scale).masked_fill(hidden, float("-inf")), -1) @ v[:, None]

    want, cur = out(target), flat.sum(0) + delta[order].sum(0)
    while len(order) < n:
        cand = [i for i in range(delta.shape[0]) if i not in order]
        err = torch.cat([(out(cur + delta[cand[a: a + chunk]]) - want).pow(2).flatten(1).sum(1)
                         for a in range(0, len(cand), chunk)])
        best = cand[int(err.argmin())]
        order.append(best)
        cur = cur + delta[best]
