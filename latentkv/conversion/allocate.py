"""Per-layer latent rank allocation: one total rank, spent where it costs the least quality.

Keeping rank r of a layer's weighted latent problem leaves error `sum_{k >= r} s_k^2`
(`linalg.spectrum`), so `s_k^2` is the marginal error of the k-th latent dim. Those errors are
in each layer's own units, and spending rank on them directly loses to a uniform split on
SmolLM2 (BENCHMARKS.md, "design notes"). So each layer's spectrum is rescaled so that its tail at the uniform
rank equals the held-out calibration NLL increase measured when that layer alone is converted;
the total rank then goes greedily to the largest rescaled marginal errors. In-context copying
hangs on a few layers (one SmolLM2 layer converted alone takes the copy probe from 60 % to 26 %),
and a latent cannot hold what they lose at any rank next to few rope dims, so the search also
tries keeping the k costliest layers exact (every rotated dim, full latent), paid for by the others'
latent rank, or spreads it greedily with none kept; a candidate wins only if its held-out NLL is no
worse than uniform's, so copying is never bought with general quality (a score-only rule kept layer
19 exact but cut others to r/2: copy 2.8 -> 15 %, WikiText-2 x1.50 -> x1.74; BENCHMARKS.md, "domains").
The result is a native-format model only: DeepSeek-V3 configs have one `kv_lora_rank` for all layers.
"""

from __future__ import annotations

import copy
import logging

import torch
from tqdm.auto import tqdm

from ..errors import LatentKVError
from ..families import attention_layers, read_attention
from .calibration import held_out_score
from .converters import lowrank_spectrum
from .dims import latent_cap
from .surgery import convert_layer, convert_oneshot

log = logging.getLogger(__name__)

SENSITIVITY_FLOOR = 1e-6  # NLL increase assumed for a layer whose measured cost is noise (<= 0)
# Most layers the allocation may keep exact: each costs the others about a layer's budget, and on
# SmolLM2 in-context copying hangs on a few layers (BENCHMARKS.md, "domains").
PROTECT_MAX = 3


def allocate_ranks(spectra: list[torch.Tensor], total: int, floor: int = 1, caps: list[int] | None = None) -> list[int]:
    """spectra: per layer (m_l,) descending singular values -> per-layer ranks summing to `total` that
    minimise the summed tail error `sum_l sum_{k >= r_l} s_lk^2`, each between `floor` and `caps[l]`."""
    caps = [min(c, s.numel()) for c, s in zip(caps or [s.numel() for s in spectra], spectra)]
    if not floor * len(spectra) <= total <= sum(caps):
        raise LatentKVError(f"cannot spread a total rank of {total} over {len(spectra)} layers with at least {floor} "
                            f"and at most {caps} each; choose a budget between those")
    gains = torch.cat([s.double()[floor:cap] ** 2 for s, cap in zip(spectra, caps)])
    owner = torch.cat([torch.full((cap - floor,), i) for i, cap in enumerate(caps)])
    # each layer's gains fall with k, so the global top-n takes a prefix of every layer
    top = gains.topk(total - floor * len(spectra)).indices
    return [floor + int(c) for c in torch.bincount(owner[top], minlength=len(spectra))]


def tail_share(s: torch.Tensor, rank: int) -> float:
    """Share of a layer's weighted error energy a rank-`rank` latent leaves out."""
    e = s.double() ** 2
    return float(e[rank:].sum() / e.sum().clamp(min=1e-300))


@torch.no_grad()
def layer_spectra(model, layout, config, rope: int, stats) -> list[torch.Tensor]:
    """Per layer, the singular values of its weighted latent problem at `rope` rotated dims."""
    return [lowrank_spectrum(read_attention(a).at_least_float32(), layout.for_layer(i), config, rope, stats[i])
            for i, a in enumerate(attention_layers(model))]


@torch.no_grad()
def layer_sensitivity(model, layout, config, dims, stats, held: torch.Tensor, progress: bool = False) -> list[float]:
    """Held-out score increase (NLL + copy NLL) when only layer l is converted at `dims`, for every l."""
    base = held_out_score(model, held)["score"]
    work = copy.deepcopy(model)
    out = []
    for i in tqdm(range(layout.num_layers), desc="layer sensitivity", disable=not progress):
        original = work.model.layers[i].self_attn
        convert_layer(model, work, i, layout, config, dims, stats[i])
        out.append(held_out_score(work, held)["score"] - base)
        work.model.layers[i].self_attn = original
    return out


@torch.no_grad()
def allocate_search(model, layout, config, dims, stats, held: torch.Tensor, choice: dict | None,
                    progress: bool) -> dict:
    """Spread the uniform split's cache values (r + p per layer) by measured sensitivity (module
    docstring). Candidates keep the k <= PROTECT_MAX costliest layers exact and give the rest's latent
    rank uniformly or greedily; the lowest held-out score wins among those whose held-out NLL is no
    worse than uniform's (copying is never bought with general quality), else uniform stays."""
    r, p = dims
    if held.numel() == 0:
        raise LatentKVError("rank allocation measures held-out calibration NLL: give --calib-samples >= 1")
    spectra = layer_spectra(model, layout, config, p, stats)
    cost = layer_sensitivity(model, layout, config, dims, stats, held, progress)
    scaled = [s * (max(c, SENSITIVITY_FLOOR) / (s[r:].double() ** 2).sum().clamp(min=1e-300)) ** 0.5
              for s, c in zip(spectra, cost)]
    same = choice is not None and (choice["kv_lora_rank"], choice["qk_rope_head_dim"]) == (r, p)
    uniform = {k: choice[k] for k in ("heldout_nll", "copy_nll", "score")} if same else \
        held_out_score(convert_oneshot(model, layout, config, dims, stats), held)
    tried = []
    for k, spread in [(k, s) for k in range(PROTECT_MAX + 1) for s in (True, False) if k or s]:
        plan = protected_plan(layout, config, dims, scaled, cost, k, spread)
        if plan is not None:
            tried.append({"protected": sorted(_costliest(cost, k)), "spread": "greedy" if spread else "uniform",
                          **held_out_score(convert_oneshot(model, layout, config, plan, stats), held), "dims": plan})
    fair = [t for t in tried if t["heldout_nll"] <= uniform["heldout_nll"] and t["score"] < uniform["score"]]
    best = min(fair or tried, key=lambda t: t["score"])
    log.info("rank allocation: held-out score %.4f, nll %.4f (exact layers %s, rest %s) vs uniform %.4f, nll %.4f"
             " -> %s", best["score"], best["heldout_nll"], best["protected"], best["spread"], uniform["score"],
             uniform["heldout_nll"], "allocated" if fair else "uniform kept")
    final = best["dims"] if fair else [(r, p)] * len(spectra)
    return {"ranks": [k for k, _ in final], "protected": best["protected"] if fair else [],
            "used": "allocated" if fair else "uniform", "heldout_score_uniform": uniform["score"],
            "heldout_nll_uniform": uniform["heldout_nll"], "heldout_score_allocated": best["score"],
            "candidates": [{k: t[k] for k in ("protected", "spread", "heldout_nll", "copy_nll", "score")}
                           for t in tried],
            "layer_score_cost": [round(c, 6) for c in cost], "dims": final,
            "latent_error_share": [round(tail_share(s, k), 6) if q == p else 0.0
                                   for s, (k, q) in zip(spectra, final)]}


@torch.no_grad()
def allocate_spectrum(model, layout, config, dims, stats) -> dict:
    """CARE-style allocation: the uniform split's total latent rank goes to the largest marginal errors
    s_lk^2 of every layer's weighted (covariance- and output-aware) spectrum, in those units directly,
    with no held-out measurement (the `sensitivity` search rescales them by measured cost instead)."""
    r, p = dims
    spectra = layer_spectra(model, layout, config, p, stats)
    caps = [latent_cap(layout.for_layer(i), config.rope, p) for i in range(layout.num_layers)]
    ranks = allocate_ranks(spectra, r * layout.num_layers, floor=1, caps=caps)
    return {"ranks": ranks, "protected": [], "used": "spectrum", "dims": [(k, p) for k in ranks],
            "latent_error_share": [round(tail_share(s, k), 6) for s, k in zip(spectra, ranks)]}


def _costliest(cost: list[float], k: int) -> list[int]:
    return sorted(range(len(cost)), key=lambda i: -cost[i])[:k]


def protected_plan(layout, config, dims, scaled: list[torch.Tensor], cost: list[float], k: int,
                   spread: bool = True) -> list | None:
    """Per-layer (kv_lora_rank, qk_rope_head_dim): the k costliest layers exact (every rotated dim and
    the full latent), the others at `p` rope dims with the remaining latent rank spread greedily over
    their rescaled spectra (at least r/2 each) or, `spread=False`, evenly; None when the rest cannot
    afford r/2 each."""
    r, p = dims
    full = layout.num_kv_heads * layout.head_dim
    keep = set(_costliest(cost, k))
    rest = [i for i in range(layout.num_layers) if i not in keep]
    total = (r + p) * layout.num_layers - 2 * full * k - p * len(rest)
    cap = latent_cap(layout, config.rope, p)
    if not spread:
        even = [total // len(rest) + (j < total % len(rest)) for j in range(len(rest))] if rest else []
        ranks = even if rest and max(1, r // 2) <= min(even) and max(even) <= cap else None
    else:
        try:
            ranks = allocate_ranks([scaled[i] for i in rest], total, floor=max(1, r // 2), caps=[cap] * len(rest))
        except LatentKVError:
            ranks = None
    if ranks is None:
        return None
    by_layer = dict(zip(rest, ranks))
    return [(full, full) if i in keep else (by_layer[i], p) for i in range(layout.num_layers)]
