"""Per-layer conversion functions, one per method: pure tensors in, MLAAttention state dict out, and
the registry `convert` dispatches through.

Signature: (src: SourceAttention, layout, config, dims: (kv_lora_rank, qk_rope_head_dim),
stats: InputStats | None) -> state dict. Weights arrive in fp32 at least.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import LatentKVError
from ..families import SourceAttention, SourceLayout, rotates
from .biases import move_exact_biases
from .configs import ExactConfig, LowRankConfig, SVDConfig, export_grade
from .keys import assemble, split_keys, stack_nope_kv
from .linalg import low_rank, spectrum
from .metrics import FACTORIZERS
from .rope import ROPE_STRATEGIES, HighFrequencies


def exact_layer(src: SourceAttention, layout: SourceLayout, config: ExactConfig, dims, stats=None) -> dict:
    """Every key dim rotated, so Y = V and the latent is V itself: A = W_v, B = I (a NoPE layer rotates
    nothing: Y = [K; V] is the latent)."""
    pairs = layout.num_kv_heads * layout.head_dim // 2 if rotates(layout) else 0
    split = HighFrequencies().split(src, layout, pairs)
    parts = split_keys(src, layout, split)
    y = stack_nope_kv(parts, src)
    return assemble(layout, src, parts, y, torch.eye(y.shape[0], dtype=torch.float64))


def svd_layer(src: SourceAttention, layout: SourceLayout, config: SVDConfig, dims, stats=None) -> dict:
    rank, rope = dims
    parts = split_keys(src, layout, HighFrequencies().split(src, layout, rope // 2))
    return assemble(layout, src, parts, *low_rank(stack_nope_kv(parts, src), rank))


def lowrank_problem(src: SourceAttention, layout: SourceLayout, config: LowRankConfig, rope: int, stats):
    """-> (key split parts, Y = [K_nope; V] (m, D+1), input stats, row metric) for `rope` rotated dims."""
    stats = stats.blended(config.attn_moment)
    strategy, extra = ROPE_STRATEGIES[config.rope], {}
    if config.rope == "rorope-export":
        extra = {"slot0": config.rope_slot0, "skip": config.rope_skip}
    elif config.rope == "elite":
        extra = {"sample": stats.sample, "memo": stats.memo}
    split = strategy.split(src, layout, rope // 2, stats.sigma, config.rope_horizon, **extra)
    # an export-grade query stays dense: engines read one q_proj
    parts = split_keys(src, layout, split, config.rope_horizon, factor_query=not export_grade(config))
    use_stats, metric = FACTORIZERS[config.factorizer].weights(parts, src, layout, stats)
    return parts, stack_nope_kv(parts, src), use_stats, metric


def lowrank_layer(src: SourceAttention, layout: SourceLayout, config: LowRankConfig, dims, stats) -> dict:
    rank, rope = dims
    parts, y, use_stats, metric = lowrank_problem(src, layout, config, rope, stats)
    # a latent bias has no place in stock engines: for the export choices the key and value biases
    # leave the latent exactly (`biases`), and the latent is kept bias-free
    exporting = config.latent_norm or config.rope == "rorope-export"
    if exporting:
        src, parts = move_exact_biases(src, layout, parts)
        y = stack_nope_kv(parts, src)
    bias_free = exporting and not y[:, -1].any()
    if config.kv_separate:
        return assemble(layout, src, parts, *separate_low_rank(y, parts["k_nope"].shape[0] * parts["k_nope"].shape[1],
                                                               rank, use_stats, metric, bias_free))
    return assemble(layout, src, parts, *low_rank(y, rank, use_stats, metric, bias_free))


def separate_low_rank(y: torch.Tensor, nk: int, rank: int, stats, metric, bias_free: bool):
    """DiffQKV-style latents: keys (the first nk rows of Y) and values factored apart, A = [A_k; A_v],
    B = [[B_k, 0], [0, B_v]]; the rank goes where the larger singular values are (the top `rank` of
    both spectra together, which minimises the summed tail). -> A (r, D+1), B (m, r)."""
    halves = (slice(0, nk), slice(nk, y.shape[0]))
    metrics = split_metric(metric, nk, len(parts_of(metric, nk)))
    spectra = [spectrum(y[h], stats, m) if h.stop > h.start else y.new_zeros(0) for h, m in zip(halves, metrics)]
    top = torch.cat(spectra).topk(min(rank, sum(len(s) for s in spectra))).indices
    ranks = [int((top < len(spectra[0])).sum()), int((top >= len(spectra[0])).sum())]
    a = y.new_zeros(rank, y.shape[1])
    b = y.new_zeros(y.shape[0], rank)
    at = 0
    for h, m, r in zip(halves, metrics, ranks):
        if r:
            a[at:at + r], b[h, at:at + r] = low_rank(y[h], r, stats, m, bias_free)
        at += r
    return a, b


def parts_of(metric, nk: int) -> list:
    """The key-side blocks of a block-diagonal metric (their rows add up to nk)."""
    if not isinstance(metric, list):
        return []
    out, rows = [], 0
    for blk in metric:
        if rows >= nk:
            break
        out.append(blk)
        rows += blk.shape[0]
    return out


def split_metric(metric, nk: int, key_blocks: int):
    """A row metric (None, one matrix, or a list of diagonal blocks) -> (key part, value part)."""
    if metric is None:
        return None, None
    if isinstance(metric, torch.Tensor):
        return metric[:nk, :nk], metric[nk:, nk:]
    return metric[:key_blocks], metric[key_blocks:]


def lowrank_spectrum(src: SourceAttention, layout: SourceLayout, config: LowRankConfig, rope: int, stats):
    """Singular values of the layer's weighted latent problem (see `linalg.spectrum`)."""
    _, y, use_stats, metric = lowrank_problem(src, layout, config, rope, stats)
    return spectrum(y, use_stats, metric)


@dataclass(frozen=True)
class Converter:
    """A method's per-layer function, and whether it needs calibration statistics (then `convert`
    runs the calibrated pipeline: statistics, split search, allocation, latent norm)."""

    layer: Callable[..., dict]
    calibrated: bool = False


# config type -> its converter: the one registry `convert` and streaming dispatch through
CONVERTERS = {ExactConfig: Converter(exact_layer), SVDConfig: Converter(svd_layer),
              LowRankConfig: Converter(lowrank_layer, calibrated=True)}


def converter_for(config) -> Converter:
    if type(config) not in CONVERTERS:
        raise LatentKVError(f"unknown conversion config {type(config).__name__}; known: "
                            + ", ".join(c.__name__ for c in CONVERTERS))
    return CONVERTERS[type(config)]
