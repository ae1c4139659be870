"""Per-head attention temperatures, fitted to the source's attention on calibration windows.

A low-rank latent and a rope key that keeps fewer frequencies both lose score variance, so a
converted layer attends more flatly than its source, and sharp attention is what copying from the
context rests on. On SmolLM2's 50 % export one global factor of 1.3 on every logit took held-out
perplexity from 60.6 to 48.7 before any healing (BENCHMARKS.md, "Attention temperatures").

Per layer and query head two factors are fitted, a on the latent part of the logit (q_nope . k_nope)
and b on the rotated part (q_pe . k_pe), to minimise the cross-entropy from the source's attention
p to softmax(a s_nope + b s_rope) over sampled query rows. That is a log-sum-exp of a linear
function of (a, b) less a linear term, so it is convex and damped Newton steps find its minimum.
Both factors fold into the query's rows (`MLAAttention.scale_query`): exact, nothing cached changes,
and stock DeepSeek-V3 engines compute them with no config entry.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..errors import LatentKVError
from ..runtime.install import is_mla
from .prefix import PrefixWalk
from .statistics import eager_attention

log = logging.getLogger(__name__)

WINDOWS = 4  # calibration windows the fit reads
ROWS = 128  # query rows per window, spread over it: bounds memory at (WINDOWS, h, ROWS, T) per layer
BOUNDS = (0.2, 5.0)  # factors outside these would mean the fit, not the layer, went wrong
NEWTON_STEPS = 30
GRID_STEP, GRID_MAX = 0.1, 2.0  # one shared temperature: 1, 1.1, ... while held-out NLL keeps falling
QUERY_WEIGHTS = (".self_attn.q_proj.", ".self_attn.q_b_proj.", ".self_attn.q_head_map")
LOSSLESS = 1e-3  # every factor this close to 1: the layers already attend as the source does (full rank)


def cross_entropy(theta: torch.Tensor, target, nope, rope, neg) -> torch.Tensor:
    """Mean over rows of CE(target, softmax(a nope + b rope + neg)) per head -> (h,).
    theta (h, 2); target, nope, rope (M, h, s); neg (M, 1, s): 0 where a key is visible, -inf-like else."""
    z = theta[:, 0, None] * nope + theta[:, 1, None] * rope + neg
    return (torch.logsumexp(z, -1) - (target * z).sum(-1)).mean(0)


def fit_head_scales(target: torch.Tensor, nope: torch.Tensor, rope: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """target (M, h, s) source attention rows; nope, rope (M, h, s) the converted logits' parts;
    visible (M, 1, s) bool -> (h, 2) factors (a, b) per head, by damped Newton steps from (1, 1)."""
    nope, rope = nope.masked_fill(~visible, 0).double(), rope.masked_fill(~visible, 0).double()
    target = target.masked_fill(~visible, 0).double()
    neg = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -1e30)
    theta = torch.ones(nope.shape[1], 2, dtype=torch.float64)
    seen = torch.stack(((target * nope).sum(-1), (target * rope).sum(-1)), -1).mean(0)  # (h, 2): E_p[parts]
    for _ in range(NEWTON_STEPS):
        q = torch.softmax(theta[:, 0, None] * nope + theta[:, 1, None] * rope + neg, -1)  # (M, h, s)
        qn, qr = q * nope, q * rope
        en, er = qn.sum(-1), qr.sum(-1)  # (M, h): E_q[parts] per row
        grad = torch.stack((en, er), -1).mean(0) - seen  # (h, 2)
        cov = [(qn * nope).sum(-1) - en * en, (qn * rope).sum(-1) - en * er, (qr * rope).sum(-1) - er * er]
        a, c, b = (v.mean(0) for v in cov)  # (h,) each: the Hessian [[a, c], [c, b]], positive semi-definite
        lam = 1e-6 * (a + b) + 1e-12  # a ridge: a head with no rotated (or no latent) part has b (or a) = 0
        a, b = a + lam, b + lam
        det = a * b - c * c
        step = torch.stack(((b * grad[:, 0] - c * grad[:, 1]) / det, (a * grad[:, 1] - c * grad[:, 0]) / det), -1)
        theta = damped(theta, step, target, nope, rope, neg)
        if step.abs().max() < 1e-4:
            break
    return theta.clamp(*BOUNDS).float()


def damped(theta, step, target, nope, rope, neg) -> torch.Tensor:
    """theta - t * step per head with the largest t in 1, 1/2, ... that lowers that head's loss."""
    before, out, done = cross_entropy(theta, target, nope, rope, neg), theta.clone(), torch.zeros(len(theta), dtype=torch.bool)
    for t in (1.0, 0.5, 0.25, 0.125, 0.0625):
        trial = theta - t * step
        better = (cross_entropy(trial, target, nope, rope, neg) < before) & ~done
        out[better], done = trial[better], done | better
    return out


def query_rows(t: int) -> torch.Tensor:
    """(min(ROWS, t - 1),) query positions spread over 1..t-1 (position 0 sees one key: nothing to fit)."""
    return torch.linspace(1, t - 1, min(ROWS, t - 1)).round().long().unique()


@torch.no_grad()
def layer_samples(src, new_attn, walk: PrefixWalk, i: int) -> tuple[torch.Tensor, ...]:
    """(target, nope, rope) each (M, h, t) and visible (M, 1, t): layer i's sampled query rows on the walk's
    windows, the source's attention probabilities beside the converted logits' two parts."""
    rows, mask = query_rows(walk.seq_len), walk.mask(i)  # additive (1, 1, T, T)
    out = ([], [], [])
    for (x,) in walk.inputs(src, 0):
        probs = src.self_attn(x, position_embeddings=walk.ropes[i], attention_mask=mask)[1][:, :, rows]  # (B, h, R, T)
        nope, rope = new_attn.score_parts(x, walk.ropes[i])
        for acc, part in zip(out, (probs, nope[:, :, rows], rope[:, :, rows])):
            acc.append(part.float().transpose(1, 2).flatten(0, 1))  # (B * R, h, T)
    target, nope, rope = (torch.cat(acc) for acc in out)  # (N * R, h, T), window-major
    visible = (mask[0, 0, rows] == 0).repeat(len(target) // len(rows), 1)[:, None]  # (N * R, 1, T)
    return target, nope, rope, visible


@torch.no_grad()
def fit_temperatures(source, model, ids: torch.Tensor, progress: bool = False) -> dict:
    """Fit and fold every MLA layer's per-head (a, b) into `model`'s queries, in place, on the first
    WINDOWS of ids (N, T) (calibration windows, never test text), each layer on the source's own inputs.
    -> {"layers": [{"nope": [h], "rope": [h]} or {"skipped": why}], "fit_windows", "rows", "max_deviation"}."""
    if not is_mla(model):
        raise LatentKVError("fit_temperatures needs a model converted by latentkv (every layer MLA)")
    ids = ids[:WINDOWS].to(next(source.parameters()).device)
    walk = PrefixWalk.embedded(source, ids, additive=True)
    base, report = query_state(model), []
    with eager_attention(source):
        for i, (src, new) in enumerate(tqdm(list(zip(source.model.layers, model.model.layers)), desc="fit temperatures",
                                            disable=not progress)):
            if new.self_attn.softcap is not None:  # a tanh cap between the logit and the softmax: not a linear fit
                report.append({"skipped": "soft-capped logits"})
            else:
                target, nope, rope, visible = layer_samples(src, new.self_attn, walk, i)
                theta = fit_head_scales(target, nope, rope, visible)
                new.self_attn.scale_query(theta[:, 0], theta[:, 1])
                report.append({"nope": [round(v, 4) for v in theta[:, 0].tolist()],
                               "rope": [round(v, 4) for v in theta[:, 1].tolist()]})
            walk.advance(0, src, walk.mask(i))
    deviation = max((abs(v - 1) for r in report for v in r.get("nope", []) + r.get("rope", [])), default=0.0)
    if deviation < LOSSLESS:  # a lossless conversion: keep its queries bit for bit
        model.load_state_dict(base, strict=False)
    log.info("attention temperatures: mean latent factor %.3f, rotated %.3f over %d layers",
             *_means(report), len(report))
    return {"layers": report, "fit_windows": list(ids.shape), "rows": int(len(query_rows(ids.shape[1]))),
            "max_deviation": round(deviation, 5)}


def _means(report: list[dict]) -> tuple[float, float]:
    fitted = [r for r in report if "nope" in r]
    if not fitted:
        return float("nan"), float("nan")
    return (sum(sum(r["nope"]) / len(r["nope"]) for r in fitted) / len(fitted),
            sum(sum(r["rope"]) / len(r["rope"]) for r in fitted) / len(fitted))


def query_state(model) -> dict[str, torch.Tensor]:
    """Copies of the weights every logit factor scales, to restore with load_state_dict(strict=False)."""
    return {k: v.clone() for k, v in model.state_dict().items() if any(q in k for q in QUERY_WEIGHTS)}


def scale_logits_of(attn, factor: float) -> None:
    """One MLA layer's logits times `factor` (both parts, every head), folded into its queries."""
    heads = attn.dims.num_heads
    attn.scale_query(torch.full((heads,), factor), torch.full((heads,), factor))


def scale_logits(model, factor: float) -> None:
    """Every MLA layer's logits times `factor`."""
    for layer in model.model.layers:
        scale_logits_of(layer.self_attn, factor)


@torch.no_grad()
def choose_temperature(model, windows: torch.Tensor, nll: Callable[[object, torch.Tensor], float]) -> dict:
    """Fold into `model` the shared logit factor among 1, 1.1, ... with the lowest `nll(model, windows)`,
    windows (N, T) calibration text at the length served. The NLL is taken as unimodal in the factor: the
    search stops at its first rise. -> {"temperature", "nll": {factor: nll}, "chosen_on": [N, T]}."""
    base = query_state(model)
    scores: dict[float, float] = {}
    for step in range(round((GRID_MAX - 1) / GRID_STEP) + 1):
        factor = round(1 + step * GRID_STEP, 4)
        model.load_state_dict(base, strict=False)
        scale_logits(model, factor)
        scores[factor] = nll(model, windows)
        if len(scores) > 1 and scores[factor] > list(scores.values())[-2]:
            break
    best = min(scores, key=scores.get)
    model.load_state_dict(base, strict=False)
    scale_logits(model, best)
    log.info("attention temperature %.2f (held-out NLL %s)", best,
             ", ".join(f"{k:.1f}: {v:.4f}" for k, v in scores.items()))
    return {"temperature": best, "nll": {str(k): round(v, 5) for k, v in scores.items()}, "chosen_on": list(windows.shape)}
