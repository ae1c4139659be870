"""Multi-head Latent Attention (DeepSeek-V2/V3) as a drop-in `self_attn` for HF decoder layers.

Einsum letters: b batch, h query head, t query token, s key token, r latent (`kv_lora_rank`),
n non-rotated q/k dim (`qk_nope_head_dim`), p rotated dim (`qk_rope_head_dim`),
v value dim (`v_head_dim`), D hidden size.

Per token the layer caches only `c_kv (r)` and the shared rotated key `k_pe (p)`.
Two paths compute the same function:
- expanded: `kv_b_proj` decompresses `c_kv` into per-head keys and values (prefill, reference);
- absorbed: `W_uk` is folded into the query and `W_uv` into the output, so every head attends
  directly over the cached `[c_kv, k_pe]` (an MQA-shaped read; decode).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..families import logit_softcap
from .kernels import KernelView, apply_rope, eager_attention, select_rope, soft_cap
from .local import LocalSpan, key_positions, local_mask
from .numerics import factor_heads, inv_rms, rms_norm, unit_rms

MLAPath = Literal["auto", "expanded", "absorbed"]


@dataclass(frozen=True)
class MLADims:
    """Shapes of one MLA layer (DeepSeek-V3 config names)."""

    hidden_size: int  # D
    num_heads: int  # h: query heads; every head reads the same latent
    kv_lora_rank: int  # r: cached latent width
    qk_rope_head_dim: int  # p: cached shared rotated key width (even)
    qk_nope_head_dim: int  # n: per-head non-rotated q/k width (0 when every key dim keeps RoPE)
    v_head_dim: int  # v: per-head value width
    softmax_scale: float  # the source's own (head_dim ** -0.5; Gemma-2: query_pre_attn_scalar ** -0.5); with a
    #                       latent norm fitted, the engines' `engine_scale` (the ratio folded into the query);
    #                       an imported DeepSeek-V3: its engine's, yarn mscale included
    q_lora_rank: int | None = None  # None: one dense q_proj
    q_bias: bool = False  # Qwen2-style biases survive conversion exactly
    kv_a_bias: bool = False
    o_bias: bool = False
    latent_norm: bool = False  # RMSNorm on c_kv (`kv_a_layernorm`), as stock DeepSeek-V3 engines apply
    rms_norm_eps: float = 1e-6
    # QK-norm sources (Qwen3, Gemma-3: "head"; OLMo-2: "proj"): the query is normalised in the source's
    # own basis, then mapped per head; keys are scaled per token by 1 / rms of the source key, one scale
    # per KV head ("head") or per token ("proj"), computed when the token is written and cached.
    qk_norm: str | None = None
    key_scales: int = 0  # S: scales cached per token
    src_head_dim: int = 0  # d: the source's head dim (query and key norms act on it)
    src_kv_heads: int = 0  # G: the source's KV heads (k_src_proj has G*d rows)
    k_src_bias: bool = False
    qk_norm_eps: float = 1e-6
    # A query kept as the source's own rows and a per-head map (q_src_proj + q_head_map, as QK-norm layers
    # hold it, without the norm): each head's n + p query rows are a map of its d source rows, so the
    # factors hold h*d*D + h*(n+p)*d weights instead of h*(n+p)*D (the dense q_proj grows with RoRoPE).
    q_factored: bool = False

    def __post_init__(self):
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.kv_lora_rank < 1:
            raise ValueError(f"kv_lora_rank must be >= 1, got {self.kv_lora_rank}")

    @property
    def engine_scale(self) -> float:
        """The softmax scale stock DeepSeek-V3 engines derive from the head dims, (n + p)^-0.5."""
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5

    @property
    def cache_values_per_token(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim + self.key_scales

    def to_dict(self) -> dict:
        return asdict(self)


class MLAAttention(nn.Module):
    """One MLA layer with both paths. Plugs in where a Llama/Mistral/Qwen2 `self_attn` sat."""

    def __init__(self, dims: MLADims, config, layer_idx: int, sliding_window: int | None = None):
        super().__init__()
        self.dims, self.config, self.layer_idx = dims, config, layer_idx
        self.softcap = logit_softcap(config)  # Gemma-2's tanh cap on scores; None elsewhere
        # The source layer's window, if any: the model's mask applies it; calibration and export read it.
        self.sliding_window = sliding_window
        self.local: LocalSpan | None = None  # a local layer (sinks + window; install.set_local_layers)
        d, h = dims, dims.num_heads
        qk_head = d.qk_nope_head_dim + d.qk_rope_head_dim
        if d.qk_norm is not None or d.q_factored:  # source query [-> its norm] -> per-head map
            self.q_src_proj = nn.Linear(d.hidden_size, h * d.src_head_dim, bias=d.q_bias)
            self.q_head_map = nn.Parameter(torch.empty(h, qk_head, d.src_head_dim))
        elif d.q_lora_rank is None:
            self.q_proj = nn.Linear(d.hidden_size, h * qk_head, bias=d.q_bias)
        else:
            self.q_a_proj = nn.Linear(d.hidden_size, d.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(d.q_lora_rank, eps=d.rms_norm_eps)
            self.q_b_proj = nn.Linear(d.q_lora_rank, h * qk_head, bias=d.q_bias)
        if d.qk_norm is not None:  # the source key rows give the per-token key scale
            self.k_src_proj = nn.Linear(d.hidden_size, d.src_kv_heads * d.src_head_dim, bias=d.k_src_bias)
            self.register_buffer("key_scale_of_pair", torch.zeros(d.qk_rope_head_dim // 2, dtype=torch.long))
        self.kv_a_proj_with_mqa = nn.Linear(d.hidden_size, d.kv_lora_rank + d.qk_rope_head_dim, bias=d.kv_a_bias)
        self.kv_a_layernorm = nn.RMSNorm(d.kv_lora_rank, eps=d.rms_norm_eps) if d.latent_norm else None
        self.kv_b_proj = nn.Linear(d.kv_lora_rank, h * (d.qk_nope_head_dim + d.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * d.v_head_dim, d.hidden_size, bias=d.o_bias)
        # Which source RoPE frequency each rotated pair uses: the rope key keeps the source's
        # rotation exactly, so llama3-scaled or other inv_freq schedules carry over unchanged.
        self.register_buffer("rope_freq_idx", torch.zeros(d.qk_rope_head_dim // 2, dtype=torch.long))

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, t, D) -> (B, h, t, n + p)."""
        b, t, _ = x.shape
        if self.dims.qk_norm is not None or self.dims.q_factored:
            q = self.q_src_proj(x)  # (B, t, h*d): with QK-norm normalised per head, or as a whole (OLMo-2)
            if self.dims.qk_norm is not None:
                q = unit_rms(q.view(b, t, self.dims.num_heads, -1) if self.dims.qk_norm == "head" else q,
                             self.dims.qk_norm_eps)
            return torch.einsum("bthd,hkd->bhtk", q.view(b, t, self.dims.num_heads, -1), self.q_head_map)
        q = self.q_proj(x) if self.dims.q_lora_rank is None else self.q_b_proj(rms_norm(self.q_a_proj(x), self.q_a_layernorm))
        return q.view(b, t, self.dims.num_heads, -1).transpose(1, 2)

    def _latent(self, x: torch.Tensor):
        """x (B, t, D) -> c_kv (B, 1, t, r), k_pe (B, 1, t, p) before RoPE, key scales (B, 1, t, S) or None."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.dims.kv_lora_rank, self.dims.qk_rope_head_dim], -1)
        if self.kv_a_layernorm is not None:
            c_kv = rms_norm(c_kv, self.kv_a_layernorm)
        scales = None
        if self.dims.qk_norm is not None:  # 1 / rms of the exact source key, per KV head or per token
            b, t, _ = x.shape
            k = self.k_src_proj(x).view(b, t, self.dims.key_scales, -1)
            scales = inv_rms(k, self.dims.qk_norm_eps)[..., 0].to(x.dtype)  # (B, t, S)
            k_pe = k_pe * scales[..., self.key_scale_of_pair.repeat(2)]
            scales = scales.unsqueeze(1)
        return c_kv.unsqueeze(1), k_pe.unsqueeze(1), scales

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of `kv_b_proj`: W_uk (h, n, r) and W_uv (h, v, r); no copy, so always in sync."""
        d = self.dims
        w = self.kv_b_proj.weight.view(d.num_heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank)
        return w[:, : d.qk_nope_head_dim], w[:, d.qk_nope_head_dim :]

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        """hidden_states (B, t, D) -> (B, t, D), attention weights or None.

        `mla_path` ("auto" | "expanded" | "absorbed", from `model(..., mla_path=...)`) picks the path for
        this call only; "auto" decodes absorbed and prefills by `absorbed_is_cheaper`."""
        d = self.dims
        path: MLAPath = kwargs.pop("mla_path", None) or "auto"
        c_kv, k_pe, scales = self._latent(hidden_states)
        cos, sin = select_rope(*position_embeddings, self.rope_freq_idx)
        k_pe = apply_rope(k_pe, cos, sin)  # (B, 1, t, p)
        if scales is not None:  # the scales ride in the rope key's slot: (B, 1, t, p + S)
            k_pe = torch.cat((k_pe, scales), -1)
        joint = None
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe, self.layer_idx)  # (B, 1, s, r), (B, 1, s, p [+ S])
            joint = cache.joint(self.layer_idx) if hasattr(cache, "joint") else None
        if scales is not None:
            k_pe, scales = k_pe.split([d.qk_rope_head_dim, d.key_scales], -1)
        b, t = hidden_states.shape[:2]
        if self.local is not None:  # its own mask, the same rule whatever the cache holds
            s = c_kv.shape[2]
            q_pos = kwargs.get("position_ids")
            q_pos = torch.arange(s - t, s, device=c_kv.device)[None] if q_pos is None else q_pos
            attention_mask = local_mask(q_pos.expand(b, -1), key_positions(cache, self.layer_idx, s, c_kv.device),
                                        self.local)
        if path == "auto":
            path = "absorbed" if (t == 1 and c_kv.shape[2] > 1) or self.absorbed_is_cheaper() else "expanded"
        if path == "absorbed" and t == 1 and scales is None and not kwargs.get("output_attentions"):
            return self._decode(hidden_states, cos, sin, c_kv, k_pe, joint, attention_mask), None
        q_nope, q_pe = self._query(hidden_states).split([d.qk_nope_head_dim, d.qk_rope_head_dim], -1)
        q_pe = apply_rope(q_pe, cos, sin)  # (B, h, t, p)
        attend = self._absorbed if path == "absorbed" else self._expanded
        out, weights = attend(q_nope, q_pe, c_kv, k_pe, attention_mask, scales=scales, **kwargs)
        return self.o_proj(out.reshape(b, t, -1)), weights

    def score_parts(self, x: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, t, D) -> the attention logits' two parts over the same t tokens, (B, h, t, t) each, softmax
        scale applied, no mask: latent (q_nope . k_nope) and rotated (q_pe . k_pe). Their sum is the logit."""
        d = self.dims
        c_kv, k_pe, scales = self._latent(x)
        cos, sin = select_rope(*position_embeddings, self.rope_freq_idx)
        q_nope, q_pe = self._query(x).split([d.qk_nope_head_dim, d.qk_rope_head_dim], -1)
        k_nope = self._keys_values(c_kv, scales)[0]
        return (q_nope @ k_nope.transpose(-1, -2) * d.softmax_scale,
                apply_rope(q_pe, cos, sin) @ apply_rope(k_pe, cos, sin).transpose(-1, -2) * d.softmax_scale)

    @torch.no_grad()
    def scale_query(self, nope: torch.Tensor, rope: torch.Tensor) -> None:
        """Multiply each head's latent and rotated logits by nope (h,) and rope (h,): the query rows (and
        biases) scale, which is exact and leaves the cache and every engine's softmax scale as they are."""
        d = self.dims
        lin = None if d.qk_norm is not None or d.q_factored else self.q_proj if d.q_lora_rank is None else self.q_b_proj
        w = self.q_head_map if lin is None else lin.weight.view(d.num_heads, d.qk_nope_head_dim + d.qk_rope_head_dim, -1)
        factor = torch.cat((nope[:, None].expand(-1, d.qk_nope_head_dim), rope[:, None].expand(-1, d.qk_rope_head_dim)), 1)
        w.mul_(factor[..., None].to(w.dtype))  # (h, n + p, D_q)
        if lin is not None and lin.bias is not None:
            lin.bias.mul_(factor.reshape(-1).to(lin.bias.dtype))

    def absorbed_is_cheaper(self) -> bool:
        """Multi-token attention over the latents costs (r + p) + r per query-key pair and head, the
        expanded one (n + p) + v: at small ranks the absorbed path is cheaper for prefill too."""
        d = self.dims
        return 2 * d.kv_lora_rank + d.qk_rope_head_dim < d.qk_nope_head_dim + d.qk_rope_head_dim + d.v_head_dim

    def _kernel(self) -> Callable:
        if self.softcap is not None and not (self.config._attn_implementation or "").startswith("flash"):
            return eager_attention  # SDPA has no soft-capping and would silently skip it
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)

    def _attend(self, view, query, key, value, mask, **kwargs):
        """query (B, h, t, k), key (B, 1|h, s, k), value (B, 1|h, s, v) -> (B, t, h, v), weights.

        Fused kernels (SDPA's flash path on CPU, flash-attn) take one head width for q, k and v; with
        v < k SDPA falls back to its math path, which measured ~1.8x slower than padding v with zeros
        to k (9 heads, 1024 x 2048, k = 136, v = 64), so the value is padded and the zeros sliced off."""
        kernel = self._kernel()
        v = value.shape[-1]
        if kernel is not eager_attention and v < key.shape[-1]:
            value = torch.nn.functional.pad(value, (0, key.shape[-1] - v))
        out, weights = kernel(view, query, key, value, mask, scaling=self.dims.softmax_scale, softcap=self.softcap,
                              **kwargs)
        return out[..., :v], weights

    def _head_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """Key scales (B, 1, s, S) -> each query head's (B, h, s, 1): heads are in KV-group order."""
        idx = torch.arange(self.dims.num_heads, device=scales.device) // (self.dims.num_heads // self.dims.key_scales)
        return scales[..., idx].permute(0, 3, 2, 1)

    def _keys_values(self, c_kv: torch.Tensor, scales=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents c_kv (B, 1, s, r) decompressed: k_nope (B, h, s, n), key scales applied, and values (B, h, s, v)."""
        d = self.dims
        b, _, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv.squeeze(1)).view(b, s, d.num_heads, -1).transpose(1, 2)  # (B, h, s, n + v)
        k_nope, value = kv.split([d.qk_nope_head_dim, d.v_head_dim], -1)
        return (k_nope if scales is None else k_nope * self._head_scales(scales)), value

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, mask, scales=None, **kwargs):
        """Decompress every cached latent into per-head K/V, then ordinary attention -> (B, t, h, v)."""
        d = self.dims
        b, _, s, _ = c_kv.shape
        k_nope, value = self._keys_values(c_kv, scales)
        key = torch.cat((k_nope, k_pe.expand(b, d.num_heads, s, -1)), -1)  # (B, h, s, n + p)
        query = torch.cat((q_nope, q_pe), -1)  # (B, h, t, n + p)
        return self._attend(KernelView(1), query, key, value, mask, **kwargs)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, scales=None, **kwargs):
        """Attend over latents: score = (W_uk^T q_nope)·c + q_pe·k_pe; out = W_uv (P c) -> (B, t, h, v).
        With key scales the latent part of the key is s_g c per KV group g (one MQA read per scale)."""
        d = self.dims
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        query = torch.cat((q_lat, q_pe), -1)  # (B, h, t, r + p)
        key, value, view = torch.cat((c_kv, k_pe), -1), c_kv, KernelView(d.num_heads)  # (B, 1, s, r + p)
        if scales is not None:
            scaled = c_kv * (scales.transpose(1, 3) if d.key_scales > 1 else scales)  # (B, S, s, r)
            key = torch.cat((scaled, k_pe.expand(-1, scaled.shape[1], -1, -1)), -1)  # (B, S, s, r + p)
            if d.key_scales > 1:  # one key per head: `eager_attention` broadcasts 1 or h key heads
                key = key.repeat_interleave(d.num_heads // d.key_scales, 1)
                value, view = c_kv.expand(-1, d.num_heads, -1, -1), KernelView(1)
        o_lat, weights = self._attend(view, query, key, value, mask, **kwargs)
        return torch.einsum("bthr,hvr->bthv", o_lat, w_uv), weights  # o_lat (B, t, h, r)

    def _decode(self, x, cos, sin, c_kv, k_pe, joint, mask) -> torch.Tensor:
        """One new token per sequence, absorbed -> (B, 1, D). The heads fold into the query axis, so a
        step is two batched matmuls over the latent cache, read as one (T, r + p) matrix per sequence
        with no per-head copy (an MQA-shaped read); W_uk/W_uv come pre-folded into the query and
        output projections where that reads fewer weight bytes (`decode_folds`).

        x (B, 1, D); cos/sin (B, 1, 1, p); c_kv (B, 1, T, r), k_pe (B, 1, T, p); joint: the cache's own
        [c_kv, k_pe] buffer (B, 1, T, r + p) or None (then it is concatenated here).
        """
        d, b = self.dims, x.shape[0]
        folds = self.decode_folds()
        if folds["q_factor"] is not None:  # per head: (r + p, k) @ (k, D_q), k <= source head_dim
            u_t, v = folds["q_factor"]
            z = F.linear(self._q_input(x)[:, 0], v).view(b, d.num_heads, -1).transpose(0, 1)  # (h, B, k)
            q = torch.bmm(z, u_t).transpose(0, 1)  # (B, h, r + p)
            if folds["q_bias"] is not None:
                q = q + folds["q_bias"].view(d.num_heads, -1)
            q_lat, q_pe = q.split([d.kv_lora_rank, d.qk_rope_head_dim], -1)
        elif folds["q"] is not None:
            q_lat, q_pe = F.linear(self._q_input(x), folds["q"], folds["q_bias"]).view(
                b, d.num_heads, -1).split([d.kv_lora_rank, d.qk_rope_head_dim], -1)
        else:
            q_nope, q_pe = self._query(x)[:, :, 0].split([d.qk_nope_head_dim, d.qk_rope_head_dim], -1)
            q_lat = torch.einsum("bhn,hnr->bhr", q_nope, self.absorbed_weights()[0])
        q_pe = apply_rope(q_pe, cos[:, 0], sin[:, 0])  # (B, h, p)
        query = torch.cat((q_lat, q_pe), -1)  # (B, h, r + p)
        key = (joint if joint is not None else torch.cat((c_kv, k_pe), -1))[:, 0]  # (B, T, r + p)
        scores = soft_cap(torch.bmm(query, key.transpose(1, 2)).float() * d.softmax_scale, self.softcap)  # (B, h, T)
        if mask is not None:
            mask = mask[:, 0, -1:, : key.shape[1]]  # (B, 1, T): the new token's row
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        o_lat = torch.bmm(torch.softmax(scores, -1).to(key.dtype), key[..., : d.kv_lora_rank])  # (B, h, r)
        if folds["o"] is not None:
            return F.linear(o_lat.reshape(b, 1, -1), folds["o"], self.o_proj.bias)
        out = torch.einsum("bhr,hvr->bhv", o_lat, self.absorbed_weights()[1])
        return self.o_proj(out.reshape(b, 1, -1))

    def _q_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dims.q_lora_rank is None else rms_norm(self.q_a_proj(x), self.q_a_layernorm)

    def decode_folds(self) -> dict:
        """Absorbed decode weights, computed once and reused until a weight changes (its version or
        storage): q (h*(r + p), D_q) = [W_uk^T W_q_nope; W_q_rope] per head, o (D, h*r) = W_o W_uv.
        Each is None where folding would read more bytes than the views (or while autograd is on,
        so training sees the real parameters)."""
        if torch.is_grad_enabled() or self.dims.qk_norm is not None:  # QK-norm: the query's norm sits in between
            return {"q": None, "q_factor": None, "q_bias": None, "o": None}
        if torch.compiler.is_compiling() and hasattr(self, "_folds"):
            return self._folds  # `compiled_decoder` computed them eagerly; the key check would break the graph
        lin = (self.q_src_proj if self.dims.q_factored else self.q_proj if self.dims.q_lora_rank is None
               else self.q_b_proj)
        params = (lin.weight, lin.bias, self.kv_b_proj.weight, self.o_proj.weight,
                  self.q_head_map if self.dims.q_factored else None)
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params if p is not None)
        if getattr(self, "_folds_key", None) != key:
            self._folds, self._folds_key = self._compute_folds(lin), key
        return self._folds

    def _compute_folds(self, lin: nn.Linear) -> dict:
        d, h, n, r = self.dims, self.dims.num_heads, self.dims.qk_nope_head_dim, self.dims.kv_lora_rank
        w_uk, w_uv = self.absorbed_weights()
        d_in = lin.weight.shape[1]
        out = {"q": None, "q_factor": None, "q_bias": None, "o": None}
        p = d.qk_rope_head_dim
        wq = self.q_head_map if d.q_factored else lin.weight.view(h, n + p, d_in)  # (h, n + p, d_src | D_q)
        fold = torch.cat((torch.einsum("hnr,hnD->hrD", w_uk, wq[:, :n]), wq[:, n:]), 1)  # (h, r + p, d_src | D_q)
        if d.q_factored:  # the factors are given: W_uk folded into the head map, the source rows kept
            out["q_factor"] = (fold.transpose(1, 2).contiguous(), lin.weight)
            if lin.bias is not None:
                out["q_bias"] = torch.einsum("hmd,hd->hm", fold, lin.bias.view(h, -1)).reshape(-1)
            return self._fold_output(out, w_uv)
        fac_u, fac_v = factor_heads(fold)
        k = fac_u.shape[-1]
        cost = {"views": (n + p) * d_in + n * r, "fold": (r + p) * d_in, "factor": k * d_in + (r + p) * k}  # per head
        best = min(cost, key=cost.get)
        if best == "fold":  # folded query rows are fewer bytes than W_q_nope + W_uk
            out["q"] = fold.reshape(-1, d_in)
        elif best == "factor":  # a query converted from GQA has rank <= the source's head_dim per head
            out["q_factor"] = (fac_u.transpose(1, 2).contiguous(), fac_v)
        if best != "views" and lin.bias is not None:
            bq = lin.bias.view(h, -1)
            out["q_bias"] = torch.cat((torch.einsum("hnr,hn->hr", w_uk, bq[:, :n]), bq[:, n:]), 1).reshape(-1)
        return self._fold_output(out, w_uv)

    def _fold_output(self, out: dict, w_uv: torch.Tensor) -> dict:
        d, h, r, v = self.dims, self.dims.num_heads, self.dims.kv_lora_rank, self.dims.v_head_dim
        if d.hidden_size * r < d.hidden_size * v + v * r:  # W_o W_uv is smaller than W_o + W_uv
            wo = self.o_proj.weight.view(d.hidden_size, h, v)
            out["o"] = torch.einsum("Dhv,hvr->Dhr", wo, w_uv).reshape(d.hidden_size, -1)
        return out

    def decode_weight_bytes(self) -> int:
        """Weight bytes one absorbed decode step reads in this layer."""
        with torch.no_grad():
            folds = self.decode_folds()
        d = self.dims
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        if d.qk_norm is not None:  # q_src_proj, q_head_map and k_src_proj are counted in `rest`
            q = size(self.absorbed_weights()[0])
        elif folds["q_factor"] is not None:
            q = sum(size(t) for t in folds["q_factor"]) + size(folds["q_bias"])
        elif folds["q"] is not None:
            q = size(folds["q"]) + size(folds["q_bias"])
        else:
            lin = self.q_proj if d.q_lora_rank is None else self.q_b_proj
            q = size(lin.weight) + size(lin.bias) + size(self.absorbed_weights()[0])
        o = size(folds["o"]) if folds["o"] is not None else size(self.o_proj.weight) + size(self.absorbed_weights()[1])
        read_above = ("q_proj", "q_b_proj", "kv_b_proj", "o_proj.weight") + (("q_src_proj", "q_head_map")
                                                                            if d.q_factored else ())
        rest = sum(size(p) for name, p in self.named_parameters() if not name.startswith(read_above))
        return q + o + rest
