"""The rope/latent split search: for a budget, try each candidate split one-shot and keep the lowest
NLL on held-out calibration windows."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ..families import SourceLayout
from .calibration import held_out_score
from .configs import LowRankConfig
from .dims import budget_values, candidate_splits
from .surgery import convert_oneshot

log = logging.getLogger(__name__)


@torch.no_grad()
def search_split(model, layout: SourceLayout, config: LowRankConfig, stats, held: torch.Tensor,
                 progress: bool) -> dict:
    """-> {kv_lora_rank, qk_rope_head_dim, heldout_nll, copy_nll, score} of the best split, plus `values`
    and every candidate's scores (the record's `split_search`)."""
    values = budget_values(config, layout)
    scores = []
    for r, p in tqdm(candidate_splits(layout, config.rope, values), desc="search split", disable=not progress):
        conv = convert_oneshot(model, layout, config, (r, p), stats)
        scores.append({"kv_lora_rank": r, "qk_rope_head_dim": p, **held_out_score(conv, held)})
    best = min(scores, key=lambda s: s["score"])
    why = ", ".join(f"rope {s['qk_rope_head_dim']}+latent {s['kv_lora_rank']}: nll {s['heldout_nll']:.4f} "
                    f"copy {s['copy_nll']:.4f}" for s in scores)
    log.info("split for %d values/token: rope %d + latent %d (lowest held-out NLL + copy NLL; tried %s)",
             values, best["qk_rope_head_dim"], best["kv_lora_rank"], why)
    return {**best, "values": values, "candidates": scores}
