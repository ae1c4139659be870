"""Attention biases (Qwen2, Qwen2.5) in the form stock DeepSeek-V3 engines run: no biases at all.

vLLM and SGLang build every DeepSeek-V3 attention projection without a bias, and transformers has
them only all-or-nothing (`attention_bias`), so an export carries none. Bias by bias:

- key bias on non-rotated dims: q_i . b adds the same number to every key query i sees, so it drops
  out of the softmax; removed, exactly (`move_exact_biases`);
- value bias: a query's attention weights sum to 1, so it leaves attention as the constant W_o b_v
  per token; it moves into o_proj's bias, exactly. The latent-norm fit then hands that constant to
  the normed latent's carrier slot, which RMSNorm keeps almost constant (`value_offsets` and
  `latent_norm.fit_layer`): approximate, its error is in the fit's `kv_b_relative_error`;
- query bias and rotated key bias: they reach the scores through q_i . R_(j-i) k_j, which depends on
  both tokens, and without a constant input there is no exact bias-free form. `fold_constant`
  replaces b by b (a . x), with a = E[x x^T]^-1 E[x] the linear read of the layer's input closest
  to 1 on calibration inputs; `constant_residual` = E(1 - a . x)^2 is the share of the bias it misses.

The native runtime keeps every bias exactly; only export-grade conversions (`--target deepseek_v3`)
go through this module.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..families import SourceAttention, SourceLayout, attention_layers, read_attention
from .prefix import PrefixWalk


def move_exact_biases(src: SourceAttention, layout: SourceLayout, parts: dict) -> tuple[SourceAttention, dict]:
    """(src, key split parts) with the non-rotated key bias dropped and the value bias moved into
    o_proj's bias: the same attention output for every input (no soft-capping, no QK-norm: the
    callers refuse those for export). parts["k_nope"]: (Gn, n, D+1), its last column the bias."""
    if src.b_k is None and src.b_v is None:
        return src, parts
    k_nope = parts["k_nope"].clone()
    k_nope[..., -1] = 0
    b_o = src.b_o
    if src.b_v is not None:
        heads = torch.arange(layout.num_heads) // layout.group_size
        per_head = src.b_v.view(layout.num_kv_heads, layout.head_dim)[heads].reshape(-1)  # (H*d,)
        moved = (src.w_o.double() @ per_head.double()).to(src.w_o.dtype)  # (D,)
        b_o = moved if b_o is None else b_o + moved
    return replace(src, b_v=None, b_o=b_o), {**parts, "k_nope": k_nope}


def constant_read(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """x (N, D) inputs -> (a (D,), E(1 - a . x)^2): the linear read of x closest to the constant 1.

    a = E[x x^T]^-1 E[x] (lightly damped); the residual is 1 - E[x]^T a, the share of a bias that
    a linear fold cannot carry."""
    x = x.double()
    second = x.T @ x / len(x)
    mean = x.mean(0)
    damp = 1e-8 * second.diagonal().mean().clamp(min=1e-30) * torch.eye(len(mean), dtype=x.dtype)
    a = torch.linalg.solve(second + damp, mean)
    return a, float((1 - x @ a).pow(2).mean())


def fold_constant(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """w (m, D), b (m,), a (D,) -> w + b a^T (m, D) in w's dtype: x -> w x + b read through a."""
    return (w.double() + b.double()[:, None] * a[None]).to(w.dtype)


def value_offsets(w_o: torch.Tensor, b_o: torch.Tensor) -> tuple[torch.Tensor, float]:
    """o_proj's weight (D, H*v) and bias (D,) -> (delta (H*v,), relative residual): per-head value
    offsets with W_o delta = b_o (least norm; exact when b_o is in W_o's range, as a moved value
    bias is), so that values + delta reproduce the bias through attention."""
    w, b = w_o.double(), b_o.double()
    delta = torch.linalg.lstsq(w, b[:, None], driver="gelsd").solution[:, 0]
    residual = (w @ delta - b).norm() / b.norm().clamp(min=1e-30)
    return delta, float(residual)


def strip_biases(state: dict, x: torch.Tensor, r: int, v_head_dim: int, num_heads: int) -> tuple[dict, torch.Tensor | None, dict]:
    """An MLA layer's state dict without q_proj, rope-key or o_proj biases (see the module doc).

    x (N, D) the layer's calibration inputs; r = kv_lora_rank. -> (state, offset (H*(n+v),) to add to
    kv_b_proj's output rows for the latent-norm refit, or None; report). The latent rows' own bias,
    if any, is left for the refit too (its target keeps it, the new rows do not)."""
    state = dict(state)
    names = [k for k in ("q_proj.bias", "q_b_proj.bias", "kv_a_proj_with_mqa.bias", "o_proj.bias") if k in state]
    if not names:
        return state, None, {}
    a, missed = constant_read(x)
    report = {"constant_residual": missed}
    if "q_proj.bias" in state:
        state["q_proj.weight"] = fold_constant(state["q_proj.weight"], state.pop("q_proj.bias"), a)
        report["query_bias"] = "folded"
    if "q_b_proj.bias" in state:  # the query factor's input is q_a_proj's latent, not x
        z = x.to(state["q_a_proj.weight"].dtype) @ state["q_a_proj.weight"].T
        az, report["query_constant_residual"] = constant_read(z)
        state["q_b_proj.weight"] = fold_constant(state["q_b_proj.weight"], state.pop("q_b_proj.bias"), az)
        report["query_bias"] = "folded"
    offset = None
    if "o_proj.bias" in state:
        delta, report["value_bias_residual"] = value_offsets(state["o_proj.weight"], state.pop("o_proj.bias"))
        n = state["kv_b_proj.weight"].shape[0] // num_heads - v_head_dim
        offset = torch.cat((delta.new_zeros(num_heads, n), delta.view(num_heads, v_head_dim)), 1).reshape(-1)
        report["value_bias"] = "carrier"
    bias = state.get("kv_a_proj_with_mqa.bias")
    if bias is not None and bias[r:].abs().max() > 0:
        w = state["kv_a_proj_with_mqa.weight"].clone()
        w[r:] = fold_constant(w[r:], bias[r:], a)
        state["kv_a_proj_with_mqa.weight"] = w
        report["rope_key_bias"] = "folded"
    return state, offset, report


@torch.no_grad()
def fold_costs(model, ids: torch.Tensor) -> list[dict]:
    """What folding biases would cost a source `model`, layer by layer, on calibration windows ids (N, T):
    the read a is fitted on the first half of the windows and scored on the second (held out: with D
    weights, a fit on few tokens reads a constant out of almost anything).

    -> per layer {"constant_residual": E(1 - a.x)^2 of its held-out attention inputs; for a source with
    biases also "query_error" / "key_error": E|b (1 - a.x)|^2 / E|W x + b|^2, the relative error the fold
    leaves in the query and (an upper bound: every key dim rotated) the key}. A source without biases
    still answers the first: how much of a bias its hidden states could carry."""
    if ids.shape[0] < 2:
        raise ValueError("fold_costs needs at least 2 windows: one half fits the read, the other scores it")
    half = ids.shape[0] // 2
    walk = PrefixWalk.embedded(model, ids)
    out = []
    for i, layer in enumerate(model.model.layers):
        x = torch.cat([x for (x,) in walk.inputs(layer, 0)]).double()  # (N, T, D)
        fit, held = x[:half].reshape(-1, x.shape[-1]), x[half:].reshape(-1, x.shape[-1])
        a, _ = constant_read(fit)
        missed = float((1 - held @ a).pow(2).mean())
        row = {"constant_residual": missed}
        src = read_attention(attention_layers(model)[i])
        for name, w, b in (("query_error", src.w_q, src.b_q), ("key_error", src.w_k, src.b_k)):
            if b is not None:
                full = (held @ w.double().T + b.double()).pow(2).sum(-1).mean()
                row[name] = float(b.double().pow(2).sum() * missed / full.clamp(min=1e-30))
        out.append(row)
        walk.advance(0, layer, walk.mask(i))
    return out
