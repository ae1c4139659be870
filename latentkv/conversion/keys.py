"""Where each source row lands: the key split into rotated and non-rotated rows (queries mixed the
same way), and the assembly of MLA layer weights from a split and latent factors.

Shapes: H query heads, G KV heads, d head dim, D hidden, p = qk_rope_head_dim, n =
qk_nope_head_dim, r = kv_lora_rank. Weights are "augmented" (m, D+1): the last column is the
bias, acting on a constant input 1, so biases are factorized with everything else.
RoPE pairs use transformers' half-split layout: pair i of a head is dims (i, i + d/2).
"""

from __future__ import annotations

import torch

from ..families import SourceAttention, SourceLayout
from .rope import KeySplit, augment, expected_rotation, mixed_key_weights


def split_keys(src: SourceAttention, layout: SourceLayout, split: KeySplit, horizon: int = 0,
               factor_query: bool = True) -> dict:
    """Rotated vs non-rotated rows of the (mixed) keys and queries, split identically on both.

    Returns augmented weights: kr (p, D+1), q_rope (H, p, D+1), k_nope (Gn, n, D+1) for Gn nope
    groups, nope_group (H,) the group each head reads, freq_idx (p/2,), and the non-rotated queries
    factored as q_map (H, n, k) @ q_nope (H, k, D+1) (`nope_queries`). When n > d (one shared group:
    RoRoPE mixes every KV head's dims, so each query head reads all G*d - p of them) q_nope keeps the
    head's own d source rows and q_map the linear map to k' space, so the MLA query needs only d
    non-rotated dims per head (the map moves into W_uk): at Llama-3-8B, q_proj is 2.5x the source's
    instead of 8x. Otherwise q_map is None and q_nope is already in k' space (k = n).
    Nope dims stay per KV group when the split is uniform with R = I (compact), else one shared group.
    With `horizon` > 1 the non-rotated query rows carry the pair's mean rotation (`expected_rotation`).
    `factor_query`: hold the query factored where that is smaller (`factored_query`); an export-grade
    conversion keeps it dense, since engines read a dense q_proj and multiplying bf16 factors back out
    would round differently from the runtime that verify-export compares against.
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
                 freq_idx=torch.tensor([i for _, i in split.kept]), pair_slot=torch.tensor([j for j, _ in split.kept]))
    if nope.shape[1] > d:  # a shared nope group (RoRoPE): keep the head's d source rows and the map
        parts.update(q_nope=wq_all, q_map=q_map)
    else:
        parts.update(q_nope=q_map @ wq_all, q_map=None)
    if src.qk_norm is not None or (factor_query and factored_query(layout, src, parts)):  # maps on source rows
        q_rope_map = torch.stack([head_query(eye, h // layout.group_size, split.mix, layout, rope)
                                  for h in range(H)])  # (H, p, d)
        nope_map = eye.expand(H, d, d) if parts["q_map"] is not None else q_map
        parts["q_head"] = torch.cat((nope_map, q_rope_map), 1)  # (H, n + p, d)
    return parts


def factored_query(layout: SourceLayout, src: SourceAttention, parts: dict) -> bool:
    """Whether the MLA query is kept as the source's rows and a per-head map (MLADims.q_factored): when the
    nope dims are shared (RoRoPE) each head's query is d source rows + p rope rows, and per head
    d*D + (d + p)*d weights are fewer than (d + p)*D. (A query bias stays on the dense form.)"""
    if src.qk_norm is not None or src.b_q is not None or parts["q_map"] is None:
        return False
    d, p, D = layout.head_dim, parts["q_rope"].shape[1], layout.hidden_size
    return d * D + (d + p) * d < (d + p) * D


def nope_queries(parts: dict) -> torch.Tensor:
    """The non-rotated query rows each head reads, in k' space: (H, n, D+1) (memory: H*n*(D+1))."""
    return parts["q_nope"] if parts["q_map"] is None else parts["q_map"] @ parts["q_nope"]


def head_query(q: torch.Tensor, g: int, mix: torch.Tensor | None, layout: SourceLayout,
               rows: torch.Tensor) -> torch.Tensor:
    """One head's augmented query rows q (d, D+1), read against KV group g -> its k'-space rows
    `rows` (R,) of the (G*d, D+1) whole: only group g's columns of the mix touch it (what `mix_rows`
    does to a zero-padded slot), and only the rows asked for are computed (all G*d of them cost
    2 GFLOP per head at Llama-2-7B's 32 KV heads)."""
    d = layout.head_dim
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
    if src.qk_norm is not None:
        return qk_norm_state(sd, src, layout, parts)
    if "q_head" in parts:  # factored_query: the source rows and the per-head map instead of q_proj
        sd = {k: v for k, v in sd.items() if not k.startswith("q_proj.")}
        sd["q_head_map"] = parts["q_head"].float()
        sd["q_src_proj.weight"] = src.w_q.float().clone()
    return sd


def qk_norm_state(sd: dict, src: SourceAttention, layout: SourceLayout, parts: dict) -> dict:
    """A QK-norm layer's query and key-scale weights in place of q_proj (see `runtime.mla`):
    q_src_proj (H*d, D) = the raw W_q, normalised per head (or whole) at run time, then q_head_map
    (H, n + p, d) per head with the norm weight folded in; k_src_proj (G*d, D) = the raw W_k, whose
    per-token rms scales the keys; key_scale_of_pair (p/2,) the scale each rope pair takes."""
    qk, H, d = src.qk_norm, layout.num_heads, layout.head_dim
    w = qk.q_weight.view(-1, d).expand(H, d).to(parts["q_head"].dtype)  # (H, d)
    sd = {k: v for k, v in sd.items() if not k.startswith("q_proj.")}
    sd["q_head_map"] = (parts["q_head"] * w[:, None, :]).float()
    for name, wt, b in (("q_src_proj", qk.w_q, qk.b_q), ("k_src_proj", qk.w_k, qk.b_k)):
        sd[f"{name}.weight"] = wt.float().clone()
        if b is not None:
            sd[f"{name}.bias"] = b.float().clone()
    # per head: a rope pair's KV head is its slot (heads are never mixed then); "proj": one scale for all
    sd["key_scale_of_pair"] = parts["pair_slot"].clone() if qk.mode == "head" else torch.zeros_like(parts["pair_slot"])
    return sd
