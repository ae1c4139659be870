"""The latent RMSNorm (`kv_a_layernorm`) that stock DeepSeek-V3 engines always apply.

A conversion's latent c = W_a x is not normalised, but transformers, vLLM and SGLang compute
kv_b_proj(g * c / rms(c)). The per-token factor 1/rms(c) is not a linear map, so no weight choice
makes it vanish; the best we can do without training is, per layer, on calibration activations:

- give up the latent slot that carries the least to a near-constant "carrier" (`carrier_row`), so
  rms(c) barely varies from token to token and the norm becomes almost a fixed scale;
- rescale the latent rows of `kv_a_proj_with_mqa` so that E[ms(c)] = 1: RMSNorm ignores the
  input scale except through eps, which then matters at the 1e-6 level in every engine (they
  disagree on eps: transformers 1e-6, vLLM `rms_norm_eps`);
- set g = 1 and refit `kv_b_proj` by least squares, W' = W E[c u^T] E[u u^T]^-1 with
  u = c / rms(c): the closest linear read-out of the normed latent to the old one. Keys and
  values are rows of W, and a row-wise least-squares solution does not depend on how the rows'
  errors are weighted, so this also minimises the query- and o_proj-weighted errors;
- drop every bias (Qwen2-style sources; `biases`): stock DeepSeek-V3 projections have none.

Layers are fitted in order on activations that flow through the already-normed prefix, so later
layers see the inputs they will get (one pass over the calibration windows in total).
"""

from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from ..errors import LatentKVError
from ..record import record_of
from ..runtime.install import install_layer, is_mla
from ..runtime.numerics import unit_rms
from .biases import strip_biases
from .prefix import PrefixWalk

NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, which transformers uses for kv_a_layernorm


@torch.no_grad()
def add_latent_norm(model, ids: torch.Tensor, progress: bool = False) -> dict:
    """Give every MLA layer of a converted `model` a fitted latent norm, in place.

    ids: (N, T) calibration windows (never the test text). -> {"layers": per-layer fit report}.
    """
    if not is_mla(model):
        raise LatentKVError("add_latent_norm needs a model converted by latentkv (every layer MLA)")
    layers = model.model.layers
    walk = PrefixWalk.embedded(model, ids.to(next(model.parameters()).device))
    report = []
    for i in tqdm(range(len(layers)), desc="fit latent norm", disable=not progress):
        if not layers[i].self_attn.dims.latent_norm:
            x = torch.cat([x for (x,) in walk.inputs(layers[i], 0)])
            report.append(norm_layer(model, i, x.reshape(-1, x.shape[-1])))
        walk.advance(0, layers[i], walk.mask(i))
    result = {"layers": report, "calib_windows": int(ids.shape[0]), "calib_seq_len": int(ids.shape[1])}
    record = record_of(model)
    if record is not None:  # keep the record true to the modules, so save/load rebuilds the norms
        record["layers"] = [layer.self_attn.dims.to_dict() for layer in layers]
        record["latent_norm"] = result
    return result


def norm_layer(model, i: int, x: torch.Tensor) -> dict:
    """Fit layer i's latent norm on its attention inputs x (tokens, D) and install it -> fit report."""
    attn = model.model.layers[i].self_attn
    state, fit = fit_layer(attn, x)
    state, scale = engine_softmax_scale(state, attn.dims)
    flags = {"q_bias": any(f"{k}.bias" in state for k in ("q_proj", "q_b_proj", "q_src_proj")),
             "kv_a_bias": "kv_a_proj_with_mqa.bias" in state, "o_bias": "o_proj.bias" in state}
    install_layer(model, i, dataclasses.replace(attn.dims, latent_norm=True, rms_norm_eps=NORM_EPS,
                                                softmax_scale=scale, **flags), state)
    return fit


def engine_softmax_scale(state: dict, dims) -> tuple[dict, float]:
    """Give the layer the softmax scale engines use, (n + p)^-0.5, by folding the ratio into the query.

    Engines fix the scale from the config's head dims, so the ratio to ours has to live in the query
    weights somewhere; done here, in the conversion's float32, the stored weights are rounded once, and
    the export copies them as they are. Folded at export instead, a bf16 checkpoint's query would be
    multiplied and rounded a second time, which stock engines and our runtime then disagree by
    (5e-2 in the logits at the Llama-3-8B shape). A QK-norm query is normalised after its projection,
    so a scale there would not survive: such layers keep theirs (and export refuses them anyway)."""
    if dims.qk_norm is not None:
        return state, dims.softmax_scale
    alpha = dims.softmax_scale / dims.engine_scale
    names = ("q_proj.weight", "q_proj.bias", "q_b_proj.weight", "q_b_proj.bias", "q_head_map")
    return {k: v * alpha if k in names else v for k, v in state.items()}, dims.engine_scale


def fit_layer(attn, x: torch.Tensor) -> tuple[dict, dict]:
    """x (tokens, D) attention inputs -> (state dict of the layer with a norm and no biases, fit report).

    The biases go first (`biases.strip_biases`): the query and rope-key biases fold into their weights,
    o_proj's bias (a moved value bias) and any latent bias become targets of the kv_b_proj refit, which
    gives them to the carrier slot."""
    d = attn.dims
    r = d.kv_lora_rank
    state = {k: v.clone() for k, v in attn.state_dict().items()}
    state, offset, folds = strip_biases(state, x, r, d.v_head_dim, d.num_heads)
    w_a, w_b = state["kv_a_proj_with_mqa.weight"], state["kv_b_proj.weight"]  # (r+p, D), (h*(n+v), r)
    bias = state.pop("kv_a_proj_with_mqa.bias", None)
    x = x.double()
    rows = w_a[:r].double()
    c = x @ rows.T  # (N, r): what bias-free rows produce, before any norm
    c0 = c if bias is None else c + bias[:r].double()  # the latent the refit must reproduce
    slot = None
    if r > 1:
        slot, carrier, t = carrier_row(x, c, w_b.double())
        rows, c = rows.clone(), c.clone()
        rows[slot], c[:, slot] = carrier, t
    scale = c.pow(2).mean(-1).mean().sqrt().clamp(min=1e-12)
    c = c / scale  # what the new kv_a rows will produce
    u = unit_rms(c, NORM_EPS)  # what the norm will output (g = 1), in fp64 here
    target = c0 @ w_b.double().T  # (N, h*(n+v))
    if offset is not None:
        target = target + offset.double()
    uu, tu = u.T @ u / len(u), target.T @ u / len(u)  # (r, r), (h*(n+v), r)
    damp = 1e-8 * uu.diagonal().mean() * torch.eye(r, dtype=uu.dtype)
    new_b = torch.linalg.solve(uu + damp, tu.T).T  # E[T u^T] E[u u^T]^-1
    err = (target - u @ new_b.T).pow(2).mean() / target.pow(2).mean().clamp(min=1e-30)
    dtype = w_b.dtype
    state["kv_b_proj.weight"] = new_b.to(dtype)
    state["kv_a_proj_with_mqa.weight"][:r] = (rows / scale).to(dtype)
    state["kv_a_layernorm.weight"] = torch.ones(r, dtype=dtype)
    rms = c.pow(2).mean(-1).sqrt()
    # how constant the normed carrier is: the relative error of a value bias it carries
    steady = {} if slot is None else {"carrier_spread": float(u[:, slot].std() / u[:, slot].mean().abs().clamp(min=1e-30))}
    return state, {"latent_rms_scale": float(scale), "rms_spread": float(rms.std() / rms.mean()), **steady,
                   "carrier_slot": slot, "kv_b_relative_error": float(err), **({"biases": folds} if folds else {})}


def carrier_row(x: torch.Tensor, c0: torch.Tensor, w_b: torch.Tensor, share: float = 100.0):
    """The latent slot given up to a near-constant "carrier", its kv_a row (D,) and values (N,).

    The norm divides every latent by its per-token rms, which varies from token to token (the fit
    report's `rms_spread`; BENCHMARKS.md, "design notes"). The direction w = Cov(x)^-1 E[x] makes w.x
    as constant as a linear read of x can be, first tokens included; scaled to hold `share` times the rest of
    the latent's energy, it pins the rms, so the other dims pass through the norm almost
    unscaled. It takes the slot that carried the least output energy, |W_b[:, j]|^2 E[c_j^2]."""
    slot = int(((w_b ** 2).sum(0) * c0.pow(2).mean(0)).argmin())
    mean = x.mean(0)
    cov = torch.cov(x.T)
    w = torch.linalg.solve(cov + 1e-2 * cov.diagonal().mean() * torch.eye(len(mean), dtype=cov.dtype), mean)
    t = x @ w
    rest = c0.pow(2).sum(-1).mean() - c0[:, slot].pow(2).mean()
    k = (share * rest / t.pow(2).mean()).sqrt()
    return slot, k * w, k * t
