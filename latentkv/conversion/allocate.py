"""Per-layer latent rank allocation: one total rank, spent where it costs the least quality.

Keeping rank r of a layer's weighted latent problem leaves error `sum_{k >= r} s_k^2`
(`linalg.spectrum`), so `s_k^2` is the marginal error of the k-th latent dim. Those errors are
in each layer's own units, and spending rank on them directly loses to a uniform split on
SmolLM2 (BENCHMARKS.md, "design notes"). So each layer's spectrum is rescaled so that its tail at the uniform
rank equals the held-out calibration NLL increase measured when that layer alone is converted;
the total rank then goes greedily to the largest rescaled marginal errors. The result is a
native-format model only: DeepSeek-V3 configs have one `kv_lora_rank` for all layers.
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
    return [lowrank_spectrum(read_attention(a).at_least_float32(), layout, config, rope, stats[i])
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
    """Spread the uniform split's total rank (r x layers) by measured sensitivity (module docstring);
    keep the allocation only if it lowers held-out calibration NLL (the gain is recorded)."""
    r, p = dims
    if held.numel() == 0:
        raise LatentKVError("rank allocation measures held-out calibration NLL: give --calib-samples >= 1")
    spectra = layer_spectra(model, layout, config, p, stats)
    cost = layer_sensitivity(model, layout, config, dims, stats, held, progress)
    scaled = [s * (max(c, SENSITIVITY_FLOOR) / (s[r:].double() ** 2).sum().clamp(min=1e-300)) ** 0.5
              for s, c in zip(spectra, cost)]
    cap = latent_cap(layout, config.rope, p)
    ranks = allocate_ranks(scaled, r * layout.num_layers, floor=max(1, r // 2), caps=[cap] * len(spectra))
    same = choice is not None and (choice["kv_lora_rank"], choice["qk_rope_head_dim"]) == (r, p)
    uniform = choice["score"] if same else \
        held_out_score(convert_oneshot(model, layout, config, dims, stats), held)["score"]
    allocated = held_out_score(convert_oneshot(model, layout, config, [(k, p) for k in ranks], stats), held)["score"]
    use = allocated < uniform
    log.info("rank allocation: held-out score %.4f vs uniform %.4f -> %s; ranks %s", allocated, uniform,
             "allocated" if use else "uniform kept", ranks)
    final = ranks if use else [r] * len(spectra)
    return {"ranks": ranks, "used": "allocated" if use else "uniform", "heldout_score_uniform": uniform,
            "heldout_score_allocated": allocated, "layer_score_cost": [round(c, 6) for c in cost],
            "dims": [(k, p) for k in final],
            "latent_error_share": [round(tail_share(s, k), 6) for s, k in zip(spectra, final)]}
