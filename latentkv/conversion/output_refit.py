"""Closed-form output refit: each converted layer's `o_proj`, refit by least squares to the source's
attention output.

Calibration windows flow through the source and the converted model side by side (`PrefixWalk`), each
on its own hidden states. At layer i, a (M, H*d) are the source attention's per-head outputs (o_proj's
input) on the source stream and a' (M, H*v) the converted layer's on the converted stream; the new
weight solves

    argmin_W' |W' a' + b' - W a - b|^2 + lam m |W' - W0|^2,     m = mean diagonal of a'^T a'

    W' = ([W, b - b'] C + lam m W0) (G + lam m I)^-1,        C = [a; 1]^T a', G = a'^T a' (H*v, H*v),

with W, b the source's o_proj, W0, b' the converted one's as the conversion left them (b' stays). So
o_proj absorbs the part of the latent's and the rope key's error that is linear in what the layer does
compute, and the error the prefix brought in. The ridge pulls towards the converted weight, not
towards zero: where the two streams agree (a lossless conversion) W' = W0 = W exactly. Only o_proj changes,
a dense weight stock DeepSeek-V3 engines read as it is, so the export carries it. Measured on SmolLM2's
export (BENCHMARKS.md, "The output refit"): at 50 % (96 + 96, temperatures) WikiText-2 test 34.40 -> 31.51
and the held-out tail 49.37 -> 43.43 before any healing, but the copy probe 6.5 % -> 1.9 % and passkey at
4096 tokens 9/15 -> 5/15; at 25 % (60 + 36) test 109.09 -> 366.73, though the layers' output error halved
there too. Least squares returns the conditional mean of the source's output given what the converted
heads compute: where they predict it poorly it shrinks and smooths the attention output, which costs the
sharp lookups copying rests on first, and at 25 % everything. So it is opt-in
(`LowRankConfig.output_refit`, `convert --output-refit on`) and no default pipeline runs it.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from .prefix import CHUNK, CONVERTED, SOURCE, PrefixWalk, advance

log = logging.getLogger(__name__)

RIDGE = 1e-3  # lam: relative to the mean diagonal of G, so the same value serves every layer and model
# A layer whose relative squared output error is below this (1 % rms: a lossless conversion, float
# rounding through the prefix only, measured 2e-6 on a tiny full-rank one) keeps its o_proj: a solve would
# fit the rounding, amplified by up to 1/lam in the directions the windows barely reach
SETTLED = 1e-4
# Fewer calibration tokens than this many per o_proj input column and the solve fits the windows rather
# than the layer (a tiny model's 160 tokens for 64 columns made its 12.5 % conversion beat its 25 % one)
ROWS_PER_COLUMN = 4


class _Inputs:
    """Holds the input of `linear`'s last forward while in a `with` block."""

    def __init__(self, linear):
        self.linear, self.last = linear, None

    def __enter__(self):
        self.handle = self.linear.register_forward_pre_hook(self._keep)
        return self

    def _keep(self, module, args):
        self.last = args[0]

    def __exit__(self, *exc):
        self.handle.remove()


def solve(w_src: torch.Tensor, w_old: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """w_src (D, H*d + 1) the source's o_proj with the bias difference as last column, w_old (D, H*v) the
    converted one, cross C (H*d + 1, H*v), gram G (H*v, H*v), all float64 -> W' (D, H*v)."""
    lam = ridge * float(gram.diagonal().mean()) + 1e-30
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, (w_src @ cross + lam * w_old).T).T


def relative_error(w: torch.Tensor, w_src: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, auto: torch.Tensor) -> float:
    """|w a' - w_src [a; 1]|^2 / |w_src [a; 1]|^2 over the windows, from the moments (auto = [a; 1]^T [a; 1])."""
    target = (w_src @ auto * w_src).sum()
    err = (w @ gram * w).sum() - 2 * (w_src @ cross * w).sum() + target
    return float(err.clamp(min=0) / target.clamp(min=1e-30))


def augmented_source(src_o, new_o) -> torch.Tensor:
    """(D, H*d + 1): the source's o_proj weight, and its bias less the converted one's as the last column."""
    def bias(linear):
        b = getattr(linear, "bias", None)
        return torch.zeros(linear.weight.shape[0], dtype=torch.float64) if b is None else b.double().cpu()
    return torch.cat((src_o.weight.double().cpu(), (bias(src_o) - bias(new_o))[:, None]), 1)


@torch.no_grad()
def layer_moments(walk: PrefixWalk, i: int, src_layer, new_layer, mask) -> tuple[torch.Tensor, ...]:
    """-> (C, G, auto) over the walk's windows (see `relative_error`); moves the source stream on through layer i."""
    src_o, new_o = src_layer.self_attn.o_proj, new_layer.self_attn.o_proj
    cross = gram = auto = None
    out = []
    for c in range(0, walk.h[SOURCE].shape[0], CHUNK):
        with _Inputs(src_o) as a_src, _Inputs(new_o) as a_new:
            out.append(advance(src_layer, walk.h[SOURCE][c: c + CHUNK], walk.ropes[i], walk.pos, mask, walk.device))
            advance(new_layer, walk.h[CONVERTED][c: c + CHUNK], walk.ropes[i], walk.pos, mask, walk.device)
        a = a_src.last.reshape(-1, a_src.last.shape[-1]).double().cpu()
        a = torch.cat((a, a.new_ones(a.shape[0], 1)), 1)  # (M, H*d + 1)
        b = a_new.last.reshape(-1, a_new.last.shape[-1]).double().cpu()  # (M, H*v)
        cross = a.T @ b if cross is None else cross + a.T @ b
        gram = b.T @ b if gram is None else gram + b.T @ b
        auto = a.T @ a if auto is None else auto + a.T @ a
    walk.h[SOURCE] = torch.cat(out)
    return cross, gram, auto


@torch.no_grad()
def refit_outputs(model, new, ids: torch.Tensor, ridge: float = RIDGE, progress: bool = False) -> dict:
    """Refit every layer's o_proj in `new` (converted from `model`) on windows ids (N, T) -> the record's
    entry: the windows' shape, the ridge, and each layer's relative output error before and after."""
    columns = new.model.layers[0].self_attn.o_proj.weight.shape[1]
    if ids.numel() < ROWS_PER_COLUMN * columns:
        log.warning("output refit skipped: %d calibration tokens for %d o_proj columns (it needs %d); give more "
                    "or longer windows (--refit-windows, --temperature-seq-len)", ids.numel(), columns,
                    ROWS_PER_COLUMN * columns)
        return {"windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "skipped": "too few calibration tokens"}
    device = next(model.parameters()).device
    walk = PrefixWalk.embedded(model, ids.to(device), streams=2)
    before, after = [], []
    for i in tqdm(range(len(model.model.layers)), desc="output refit", disable=not progress):
        src_layer, new_layer = model.model.layers[i], new.model.layers[i]
        mask = walk.mask(i)
        cross, gram, auto = layer_moments(walk, i, src_layer, new_layer, mask)
        w_src = augmented_source(src_layer.self_attn.o_proj, new_layer.self_attn.o_proj)
        w_old = new_layer.self_attn.o_proj.weight.double().cpu()
        err = relative_error(w_old, w_src, cross, gram, auto)
        w_new = solve(w_src, w_old, cross, gram, ridge) if err > SETTLED else w_old
        before.append(err)
        after.append(relative_error(w_new, w_src, cross, gram, auto))
        weight = new_layer.self_attn.o_proj.weight
        weight.copy_(w_new.to(weight.dtype))
        walk.advance(CONVERTED, new_layer, mask)
    log.info("output refit on %d x %d tokens: mean relative attention-output error %.4f -> %.4f",
             ids.shape[0], ids.shape[1], sum(before) / len(before), sum(after) / len(after))
    return {"windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "ridge": ridge,
            "error_before": [float(f"{e:.4g}") for e in before], "error_after": [float(f"{e:.4g}") for e in after]}
