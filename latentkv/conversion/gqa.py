"""Fewer KV heads, same architecture: merge a source's KV heads into K, a stock checkpoint every engine runs.

The result is the source's own class (e.g. `LlamaForCausalLM` with `num_key_value_heads = K`):
llama.cpp, Ollama, TensorRT-LLM and edge runtimes serve it with no latentkv code. Query head h keeps
reading one KV head, j = h // (H / K), which replaces the G / K source heads of its group.

Keys (RoPE-aware). Per frequency pair p a key is a complex number z = k_p + i k_(p + d/2) that RoPE
multiplies by e^(i theta t); a linear map that commutes with every rotation is a complex scalar. So
the merged key of group j is, per pair, one complex combination y = sum_g c_g z_g of its heads' pairs,
and each source head is read back as z_g ~ u_g y: query head h's pair becomes conj(u_g) q_h, and
q . k = Re(conj(q) z) keeps its form at every position. c and u come from the top eigenvector of the
group's complex key covariance E[z z^H] (rotation-invariant: one position's angle multiplies every
head alike), each head weighted by the query energy that reads it.
Values. The group's stacked values (m d rows) are reduced to d by activation-aware PCA (each head
weighted by the o_proj energy that reads it); o_proj's columns take the map back.
At K = G every group is one head and both steps are exact: the source's logits.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from ..errors import LatentKVError
from ..families import SourceAttention, SourceLayout, attention_layers, read_attention, source_layout
from .calibration import calibration_ids, oneshot_stats
from .configs import LowRankConfig
from .rope import augment


def check_kv_heads(layout: SourceLayout, kv_heads: int) -> None:
    """One line for a K that cannot be a merge of the source's KV heads."""
    g = layout.num_kv_heads
    if not 1 <= kv_heads <= g or g % kv_heads:
        divisors = [k for k in range(1, g + 1) if g % k == 0]
        raise LatentKVError(f"--kv-heads {kv_heads}: the source has {g} KV heads, so K must divide {g}; "
                            f"choose one of {divisors}")


def merge_heads(src: SourceAttention, layout: SourceLayout, kv_heads: int, sigma: torch.Tensor) -> dict:
    """Source attention weights -> a K-KV-head attention's state dict (q/k/v/o_proj weights, and biases
    where the source has them). sigma (D+1, D+1): E[[x; 1][x; 1]^T] of the layer's attention inputs."""
    check_kv_heads(layout, kv_heads)
    H, G, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
    s = sigma.double()
    wq = augment(src.w_q, src.b_q).view(H, d, -1)  # (H, d, D+1)
    wk = augment(src.w_k, src.b_k).view(G, d, -1)
    wv = augment(src.w_v, src.b_v).view(G, d, -1)
    wo = src.w_o.double().view(-1, H, d)  # (D, H, d)
    reader = torch.arange(H) // layout.group_size  # the source KV head each query head reads
    new_q, new_k = merge_keys(wq, wk, s, reader, kv_heads)
    new_v, new_o = merge_values(wv, wo, s, reader, kv_heads)
    out = {"o_proj.weight": new_o}
    for name, b, w in (("q_proj", src.b_q, new_q), ("k_proj", src.b_k, new_k), ("v_proj", src.b_v, new_v)):
        rows = w.reshape(-1, w.shape[-1])  # (heads * d, D+1)
        out[f"{name}.weight"] = rows[:, :-1]
        if b is not None:
            out[f"{name}.bias"] = rows[:, -1]
    if src.b_o is not None:
        out["o_proj.bias"] = src.b_o.double()
    return out


def pairs(w: torch.Tensor) -> torch.Tensor:
    """(n, d, D+1) rotate-half rows -> (n, d/2, D+1) complex rows z = first half + i second half."""
    half = w.shape[1] // 2
    return torch.complex(w[:, :half], w[:, half:])


def unpairs(z: torch.Tensor) -> torch.Tensor:
    return torch.cat((z.real, z.imag), 1)


def merge_keys(wq, wk, s, reader, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (queries (H, d, D+1), merged keys (K, d, D+1)); see the module doc."""
    zq, zk = pairs(wq), pairs(wk)  # (H, p, D+1), (G, p, D+1)
    sc = s.to(zq.dtype)
    energy = torch.einsum("hpi,ij,hpj->hp", zq, sc, zq.conj()).real  # E|q_p|^2 per query head and pair
    omega = torch.zeros(zk.shape[:2], dtype=energy.dtype).index_add_(0, reader, energy).clamp(min=1e-12)  # (G, p)
    m = zk.shape[0] // kv_heads
    u = torch.empty(zk.shape[:2], dtype=zk.dtype)  # source head g's pair ~ u * merged pair
    merged = torch.empty(kv_heads, *zk.shape[1:], dtype=zk.dtype)
    for j in range(kv_heads):
        z, w = zk[j * m:(j + 1) * m], omega[j * m:(j + 1) * m].sqrt()  # (m, p, D+1), (m, p)
        cov = torch.einsum("gpi,ij,hpj->pgh", z, sc, z.conj())  # (p, m, m) Hermitian
        _, vecs = torch.linalg.eigh(w.T[:, :, None] * cov * w.T[:, None, :])
        e = vecs[..., -1]  # (p, m): the top component per pair
        merged[j] = torch.einsum("pg,gpi->pi", e.conj() * w.T, z)
        u[j * m:(j + 1) * m] = (e / w.T).T
    new_q = unpairs(u[reader].conj()[..., None] * zq)
    return new_q, unpairs(merged)


def merge_values(wv, wo, s, reader, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (merged values (K, d, D+1), o_proj (D, H*d)); see the module doc."""
    G, d, _ = wv.shape
    m = G // kv_heads
    energy = wo.pow(2).sum((0, 2)) / d  # (H,) o_proj energy per query head
    omega = torch.zeros(G, dtype=energy.dtype).index_add_(0, reader, energy).clamp(min=1e-12).sqrt()  # (G,)
    back = torch.empty(G, d, d, dtype=wv.dtype)  # source value g ~ back[g] @ merged value
    merged = torch.empty(kv_heads, d, wv.shape[-1], dtype=wv.dtype)
    for j in range(kv_heads):
        v = (wv[j * m:(j + 1) * m] * omega[j * m:(j + 1) * m, None, None]).reshape(m * d, -1)  # (m d, D+1)
        _, vecs = torch.linalg.eigh(v @ s @ v.T)
        e = vecs[:, -d:]  # (m d, d) the top d components
        merged[j] = e.T @ v
        back[j * m:(j + 1) * m] = e.view(m, d, d) / omega[j * m:(j + 1) * m, None, None]
    new_o = torch.einsum("ohd,hde->ohe", wo, back[reader]).reshape(wo.shape[0], -1)
    return merged, new_o


def to_gqa(model, kv_heads: int, *, tokenizer=None, calib_ids: torch.Tensor | None = None,
           calib: LowRankConfig | None = None, progress: bool = True):
    """A copy of source `model` with its KV heads merged into `kv_heads`, as the same stock class.

    Calibration: `calib_ids` (N, T), else `calib`'s text settings (default: the mixture) read with
    `tokenizer`, as `convert` does.
    The copy's config says `num_key_value_heads = kv_heads`; `save_pretrained` writes a checkpoint any
    engine loads. Refused (one line): QK-norm (a norm of a merged key is not a merge of normed keys),
    fused qkv_proj (Phi-3)."""
    layout = source_layout(model.config)
    check_kv_heads(layout, kv_heads)
    attns = attention_layers(model)
    if any(getattr(a, "k_norm", None) is not None for a in attns):
        raise LatentKVError("--target gqa: this model normalises its keys per head (QK-norm), and the norm of a merged "
                            "key is not a merge of normed keys; convert it to MLA instead")
    if any(hasattr(a, "qkv_proj") for a in attns):
        raise LatentKVError("--target gqa: fused qkv_proj (Phi-3) is not supported; convert it to MLA instead")
    if calib_ids is None:
        calib_ids = calibration_ids(tokenizer, calib or LowRankConfig(kv_budget=0.5))[0]  # only its calib fields count
    stats = oneshot_stats(model, calib_ids, progress=progress, attention=False)
    state = dict(model.state_dict())
    for i, (attn, st) in enumerate(tqdm(list(zip(attns, stats)), desc="merge KV heads", disable=not progress)):
        merged = merge_heads(read_attention(attn).at_least_float32(), layout, kv_heads, st.sigma)
        prefix = f"model.layers.{i}.self_attn."
        dtype = attn.q_proj.weight.dtype
        state.update({prefix + k: v.to(dtype) for k, v in merged.items()})
    config = copy.deepcopy(model.config)
    config.num_key_value_heads = kv_heads
    new = type(model)(config).to(next(model.parameters()).dtype).eval()
    new.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    return new
