"""Calibrated conversion: statistics, the rope/latent split search, and sequential conversion.

Sequential (GPTQ-style): calibration windows flow through the source and the converted prefix
side by side; layer l is factorized on the statistics of *its converted inputs*, and its
up-projections are refit to reproduce the *source's* outputs, so later layers absorb earlier
layers' error. One-shot: every layer uses the source model's own statistics (from hooks).
"""

from __future__ import annotations

import copy
import sys

import torch
from tqdm.auto import tqdm

from .calibrate import InputStats, Moments, calibration_batches, check_not_test_split, collect_stats
from .errors import LatentKVError
from .families import SourceLayout, sliding_window
from .methods import LowRankConfig, budget_values, max_rank, rope_grid

HELD_OUT = 4  # calibration windows kept aside to score candidate splits
CHUNK = 4  # windows per forward in the sequential pass (bounds attention memory)


def calibration_ids(tokenizer, config: LowRankConfig) -> torch.Tensor:
    """(calib_samples + HELD_OUT, calib_seq_len) token windows from `config.calib`."""
    from .text import load_text

    if tokenizer is None:
        raise LatentKVError(f"method {config.method} calibrates on text: pass tokenizer= (or calib_ids=) to convert()")
    check_not_test_split(config.calib)
    return calibration_batches(tokenizer, load_text(config.calib), config.calib_samples + HELD_OUT,
                               config.calib_seq_len)


def split_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (fit windows, held-out windows), the held-out ones spread over the text."""
    if ids.shape[0] <= HELD_OUT:
        return ids, ids[:0]
    held = torch.linspace(0, ids.shape[0] - 1, HELD_OUT).round().long()
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[held] = False
    return ids[keep], ids[held]


def convert_calibrated(model, layout: SourceLayout, config: LowRankConfig, tokenizer, calib_ids, progress: bool,
                       cache: dict | None = None):
    """-> (converted model, split-search record or None)."""
    from .conversion import check_dims

    ids = calib_ids if calib_ids is not None else calibration_ids(tokenizer, config)
    fit, held = split_ids(ids)
    oneshot = oneshot_stats(model, ids, cache, progress, attention=config.attn_moment > 0)
    choice = None
    dims = config.dims(layout)
    if dims is None:
        choice = search_split(model, layout, config, oneshot, held, progress)
        dims = (choice["kv_lora_rank"], choice["qk_rope_head_dim"])
    check_dims(layout, *dims, rope=config.rope)
    if config.rank_allocation != "uniform":
        from .allocate import allocate_search

        alloc = allocate_search(model, layout, config, dims, oneshot, held, choice, progress)
        choice = {**(choice or {}), "allocation": alloc}
        dims = [tuple(d) for d in alloc["dims"]]
    if config.sequential:
        new = convert_sequential(model, layout, config, dims, fit, progress)
    else:
        new = convert_oneshot(model, layout, config, dims, oneshot, progress)
    if config.latent_norm:
        from .latent_norm import add_latent_norm

        choice = {**(choice or {}), "latent_norm": add_latent_norm(new, fit, progress)}
    return new, choice


def oneshot_stats(model, ids: torch.Tensor, cache: dict | None = None, progress: bool = False,
                  attention: bool = True) -> list[InputStats]:
    """The source's per-layer statistics on the fit part of `ids`, from `cache` when already collected
    (stats with attention-averaged moments serve requests without them too)."""
    cache = {} if cache is None else cache
    key = (tuple(ids.shape), int(ids.sum()))
    if key not in cache or (attention and cache[key][0].attn_sigma is None):
        cache[key] = collect_stats(model, split_ids(ids)[0], progress, attention)
    return cache[key]


def per_layer(dims, layout: SourceLayout) -> list[tuple[int, int]]:
    """(r, p) for every layer from one pair or a per-layer list."""
    return list(dims) if isinstance(dims, list) else [tuple(dims)] * layout.num_layers


def convert_oneshot(model, layout, config, dims, stats: list[InputStats], progress: bool = False):
    """dims: (kv_lora_rank, qk_rope_head_dim) for all layers, or a list with one pair per layer."""
    from .conversion import convert_layer

    new = copy.deepcopy(model)
    for i, d in enumerate(tqdm(per_layer(dims, layout), desc="convert (one-shot)", disable=not progress)):
        convert_layer(model, new, i, layout, config, d, stats[i])
    return new


def candidate_splits(layout: SourceLayout, config: LowRankConfig, values: int) -> list[tuple[int, int]]:
    """(kv_lora_rank, qk_rope_head_dim) pairs worth trying for `values` cache values."""
    out = []
    for frac in (1 / 8, 1 / 4, 3 / 8, 1 / 2):
        r, p = split_at(layout, config, values, frac)
        if r >= 1 and (r, p) not in out:
            out.append((r, p))
    if not out:
        raise LatentKVError(f"{values} cache values per token cannot hold a rotated pair and a latent; raise the budget")
    return out


def split_at(layout: SourceLayout, config: LowRankConfig, values: int, frac: float) -> tuple[int, int]:
    """(kv_lora_rank, qk_rope_head_dim) giving about `frac` of `values` to the rotated key."""
    step, most_rope = rope_grid(layout, config.rope)
    p = min(most_rope, max(step, step * round(values * frac / step)))
    return min(values - p, max_rank(layout, p, shared_nope=config.rope != "high")), p


@torch.no_grad()
def search_split(model, layout, config, stats, held: torch.Tensor, progress: bool) -> dict:
    """Try each candidate split one-shot and keep the lowest NLL on held-out calibration windows."""
    values = budget_values(config, layout)
    scores = []
    for r, p in tqdm(candidate_splits(layout, config, values), desc="search split", disable=not progress):
        conv = convert_oneshot(model, layout, config, (r, p), stats)
        scores.append({"kv_lora_rank": r, "qk_rope_head_dim": p, "heldout_nll": held_out_nll(conv, held)})
    best = min(scores, key=lambda s: s["heldout_nll"])
    why = ", ".join(f"rope {s['qk_rope_head_dim']}+latent {s['kv_lora_rank']}: nll {s['heldout_nll']:.4f}"
                    for s in scores)
    if progress:
        print(f"split for {values} values/token: rope {best['qk_rope_head_dim']} + latent {best['kv_lora_rank']} "
              f"(lowest held-out calibration NLL; tried {why})", file=sys.stderr, flush=True)
    return {**best, "values": values, "candidates": scores}


def held_out_nll(model, held: torch.Tensor) -> float:
    from .evaluate import window_nll

    total = sum(window_nll(model, row, 1) for row in held)
    return total / max(1, held.shape[0] * (held.shape[1] - 1))


@torch.no_grad()
def convert_sequential(model, layout, config, dims, batches: torch.Tensor, progress: bool):
    """Layer by layer through source and converted prefix; see the module docstring."""
    from .conversion import convert_layer

    new = copy.deepcopy(model)
    h_src = model.model.embed_tokens(batches)  # (N, T, D)
    h_new = h_src.clone()
    pos = torch.arange(batches.shape[1])[None]
    rope = model.model.rotary_emb(h_src[:1], pos)
    dims = per_layer(dims, layout)
    for i in tqdm(range(layout.num_layers), desc="convert (sequential)", disable=not progress):
        src_layer, new_layer = model.model.layers[i], new.model.layers[i]
        sigma, cross = Moments.empty(layout.hidden_size), Moments.empty(layout.hidden_size)
        for c in range(0, batches.shape[0], CHUNK):
            x_src = src_layer.input_layernorm(h_src[c: c + CHUNK])
            x_new = new_layer.input_layernorm(h_new[c: c + CHUNK])
            sigma.add(x_new)
            cross.add(x_src, x_new)
        stats = InputStats(sigma.second(), cross.second())
        convert_layer(model, new, i, layout, config, dims[i], stats)
        mask = causal_mask(batches.shape[1], sliding_window(model.config, src_layer.self_attn, i))
        h_src = _run(src_layer, h_src, rope, pos, mask)
        h_new = _run(new.model.layers[i], h_new, rope, pos, mask)
    return new


def causal_mask(t: int, window: int | None) -> torch.Tensor:
    """(1, 1, t, t) bool, True = may attend; with a sliding window as the source layer has."""
    i = torch.arange(t)
    allowed = i[:, None] >= i[None, :]
    if window:
        allowed &= (i[:, None] - i[None, :]) < window
    return allowed[None, None]


def _run(layer, h: torch.Tensor, rope, pos, mask, device=None) -> torch.Tensor:
    """h (N, T, D) through one decoder layer, CHUNK windows at a time; with `device`, each chunk
    visits it (layer, rope, pos and mask must already be there) and the result stays where h is."""
    out = []
    for c in range(0, h.shape[0], CHUNK):
        o = layer(h[c: c + CHUNK].to(device or h.device), attention_mask=mask, position_ids=pos,
                  position_embeddings=rope)
        out.append((o[0] if isinstance(o, tuple) else o).to(h.device))
    return torch.cat(out)
