"""Pure tensor math of the conversion: source attention weights -> MLA layer weights.

Shapes: H query heads, G KV heads, d head dim, D hidden, p = qk_rope_head_dim,
n = qk_nope_head_dim, r = kv_lora_rank. RoPE pairs use transformers' half-split layout:
pair i of a head is dims (i, i + d/2) and rotates with the source's inv_freq[i].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .families import SourceAttention, SourceLayout


@dataclass(frozen=True)
class RopeSplit:
    """Per KV head g, which frequency pairs i keep their rotation; order = pair order in k_pe."""

    kept: tuple[tuple[int, int], ...]  # (g, i), length p / 2

    @staticmethod
    def high_frequencies(layout: SourceLayout, pairs_per_head: int) -> RopeSplit:
        """MHA2MLA's S_high: the `pairs_per_head` fastest-rotating pairs (i = 0 is the fastest)."""
        return RopeSplit(tuple((g, i) for g in range(layout.num_kv_heads) for i in range(pairs_per_head)))

    def nope_dims(self, layout: SourceLayout) -> torch.Tensor:
        """(G, n) within-head dims that lose rotation; n must be equal for every KV head."""
        half = layout.head_dim // 2
        rows = []
        for g in range(layout.num_kv_heads):
            kept = {i for gg, i in self.kept if gg == g}
            rows.append([j for j in range(layout.head_dim) if j % half not in kept])
        if len({len(r) for r in rows}) != 1:
            raise ValueError("every KV head must keep the same number of rotated pairs")
        return torch.tensor(rows, dtype=torch.long).view(layout.num_kv_heads, -1)


def split_rope(src: SourceAttention, layout: SourceLayout, split: RopeSplit) -> dict:
    """Separate rotated from non-rotated rows of W_q and W_k (notes §2, identically on both sides).

    Returns w_kr (p, D), b_kr (p,), w_q_rope (H, p, D), b_q_rope (H, p), w_q_nope (H, n, D),
    b_q_nope (H, n), w_k_nope (G, n, D), b_k_nope (G, n), freq_idx (p/2,). Biases may be None.
    """
    H, G, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    half = d // 2
    grp = torch.tensor([g for g, _ in split.kept] * 2)  # (p,) KV head of each rotated dim
    freq = torch.tensor([i for _, i in split.kept])  # (p/2,)
    off = torch.cat((freq, freq + half))  # (p,) within-head dim of each rotated dim
    g_of_h = torch.arange(H) // layout.group_size  # (H,)
    q_rows = torch.arange(H)[:, None] * d + off[None, :]  # (H, p)
    own = (grp[None, :] == g_of_h[:, None]).to(src.w_q.dtype)  # (H, p): head h sees only its group's dims
    nope = split.nope_dims(layout)  # (G, n)
    q_nope_rows = torch.arange(H)[:, None] * d + nope[g_of_h]  # (H, n)
    k_nope_rows = torch.arange(G)[:, None] * d + nope  # (G, n)
    k_rows = grp * d + off

    def take(w, rows, scale=None):
        if w is None:
            return None
        out = w[rows]
        return out if scale is None else out * (scale[..., None] if w.dim() == 2 else scale)

    return dict(
        w_kr=take(src.w_k, k_rows), b_kr=take(src.b_k, k_rows),
        w_q_rope=take(src.w_q, q_rows, own), b_q_rope=take(src.b_q, q_rows, own),
        w_q_nope=take(src.w_q, q_nope_rows), b_q_nope=take(src.b_q, q_nope_rows),
        w_k_nope=take(src.w_k, k_nope_rows), b_k_nope=take(src.b_k, k_nope_rows),
        freq_idx=freq,
    )


def stack_nope_kv(parts: dict, src: SourceAttention) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Y = [K_nope; V] as one linear map: weight (G*(n + d), D), bias (G*(n + d),) or None."""
    w = torch.cat((parts["w_k_nope"].flatten(0, 1), src.w_v))
    if parts["b_k_nope"] is None and src.b_v is None:
        return w, None
    zeros = w.new_zeros
    bk = parts["b_k_nope"].flatten() if parts["b_k_nope"] is not None else zeros(parts["w_k_nope"].shape[:2].numel())
    bv = src.b_v if src.b_v is not None else zeros(src.w_v.shape[0])
    return w, torch.cat((bk, bv))


def factorize_identity(w: torch.Tensor, b: torch.Tensor | None, rank: int):
    """Lossless 'factorization' used by the exact embedding: latent = Y itself.

    w (m, D), b (m,) -> w_a (m, D), b_a (m,), w_b (m, m) = I.
    """
    if rank != w.shape[0]:
        raise ValueError(f"identity factorization needs rank == {w.shape[0]}, got {rank}")
    return w.clone(), None if b is None else b.clone(), torch.eye(rank, dtype=w.dtype)


def factorize_svd(w: torch.Tensor, b: torch.Tensor | None, rank: int):
    """Weight-only truncated SVD (MHA2MLA joint SVD), singular values split evenly between factors.

    w (m, D), b (m,) -> w_a (r, D), b_a (r,), w_b (m, r). The bias is carried by the latent as the
    least-squares b_a with w_b b_a ~= b, since kv_b_proj has no bias (as in DeepSeek-V3).
    """
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    w_a, w_b = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    b_a = None if b is None else torch.linalg.lstsq(w_b, b.double()[:, None]).solution[:, 0]
    cast = lambda t: None if t is None else t.to(w.dtype)  # noqa: E731
    return cast(w_a), cast(b_a), cast(w_b)


def assemble(layout: SourceLayout, src: SourceAttention, parts: dict, w_a, b_a, w_b) -> dict:
    """MLAAttention state dict from the rope split and the latent factors.

    kv_b_proj rows per head h: [W_uk of its KV group (n, r); W_uv of its group (d, r)].
    """
    H, G, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    n = parts["w_q_nope"].shape[1]
    g_of_h = torch.arange(H) // layout.group_size
    r = w_b.shape[1]
    w_uk = w_b[: G * n].view(G, n, r)[g_of_h]  # (H, n, r)
    w_uv = w_b[G * n:].view(G, d, r)[g_of_h]  # (H, d, r)
    sd = {
        "q_proj.weight": torch.cat((parts["w_q_nope"], parts["w_q_rope"]), 1).flatten(0, 1),
        "kv_a_proj_with_mqa.weight": torch.cat((w_a, parts["w_kr"])),
        "kv_b_proj.weight": torch.cat((w_uk, w_uv), 1).flatten(0, 1),
        "o_proj.weight": src.w_o.clone(),
        "rope_freq_idx": parts["freq_idx"].clone(),
    }
    if src.b_q is not None:
        sd["q_proj.bias"] = torch.cat((parts["b_q_nope"], parts["b_q_rope"]), 1).flatten()
    if b_a is not None or parts["b_kr"] is not None:
        zeros = w_a.new_zeros
        sd["kv_a_proj_with_mqa.bias"] = torch.cat((b_a if b_a is not None else zeros(w_a.shape[0]),
                                                   parts["b_kr"] if parts["b_kr"] is not None else zeros(parts["w_kr"].shape[0])))
    if src.b_o is not None:
        sd["o_proj.bias"] = src.b_o.clone()
    return sd
