"""The rope/latent split search: for a budget, try each candidate split one-shot and keep the lowest
NLL on held-out calibration windows; the copy NLL decides only between near-ties.

Why not the sum NLL + copy NLL: at 25 % on SmolLM2 neither split copies at all, and the sum picked
rorope-fold2 24+72 while held-out NLL alone ranked 60+36 first (4.162 vs 4.309); on WikiText-2 *valid*
60+36 measured ppl 97.7 against 131.1 (BENCHMARKS.md, "deploy"). Where copying survives (50 %) the
lowest NLL and the lowest sum were the same split.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ..errors import LatentKVError
from ..families import SourceLayout, attention_layers, plain_frequencies, read_attention
from .calibration import held_out_score
from .configs import LowRankConfig
from .dims import budget_values, candidate_splits
from .rope import ROPE_STRATEGIES, best_schedule
from .surgery import convert_oneshot

log = logging.getLogger(__name__)

# Held-out NLL differences below this are within the spread of the few calibration windows (one per
# mixture component); only then may copying decide.
COPY_TIE_NATS = 0.02


@torch.no_grad()
def search_split(model, layout: SourceLayout, config: LowRankConfig, stats, held: torch.Tensor,
                 progress: bool) -> dict:
    """-> {rope, kv_lora_rank, qk_rope_head_dim, heldout_nll, copy_nll, score} of the best (RoPE strategy,
    split) among `config.rope` and `config.rope_choices`, plus `values` and every candidate's scores (the
    record's `split_search`)."""
    values = budget_values(config, layout)
    tries = [(config.rope, r, p) for r, p in candidate_splits(layout, config.rope, values)]
    for rope in [r for r in dict.fromkeys(config.rope_choices) if r != config.rope]:  # in order: reproducible
        try:
            tries += [(rope, r, p) for r, p in candidate_splits(layout, rope, values)]
        except LatentKVError:  # an extra choice that cannot hold this budget is skipped, not an error
            log.info("split search: %s cannot hold %d values per token; not tried", rope, values)
    scores = []
    for rope, r, p in tqdm(tries, desc="search split", disable=not progress):
        chosen = export_schedule(model, layout, replace(config, rope=rope), p, stats)
        conv = convert_oneshot(model, layout, chosen, (r, p), stats)
        slot0 = {} if chosen.rope_slot0 is None else {"rope_slot0": chosen.rope_slot0, "rope_skip": chosen.rope_skip}
        scores.append({"rope": rope, "kv_lora_rank": r, "qk_rope_head_dim": p, **slot0, **held_out_score(conv, held)})
    best = pick_split(scores)
    why = ", ".join(f"{s['rope']} {s['qk_rope_head_dim']}+latent {s['kv_lora_rank']}: nll {s['heldout_nll']:.4f} "
                    f"copy {s['copy_nll']:.4f}" for s in scores)
    log.info("split for %d values/token: %s, rope %d + latent %d (lowest held-out NLL; copy NLL within %.2f nats; tried %s)",
             values, best["rope"], best["qk_rope_head_dim"], best["kv_lora_rank"], COPY_TIE_NATS, why)
    return {**best, "values": values, "rule": f"lowest heldout_nll; copy_nll breaks ties within {COPY_TIE_NATS}",
            "candidates": scores}


def pick_split(scores: list[dict], tie: float | None = None) -> dict:
    """The candidate with the lowest held-out NLL, unless others are within `tie` nats of it: then the
    lowest NLL + copy NLL among those. scores: dicts with heldout_nll, copy_nll, score."""
    tie = COPY_TIE_NATS if tie is None else tie
    floor = min(s["heldout_nll"] for s in scores)
    near = [s for s in scores if s["heldout_nll"] <= floor + tie]
    return min(near, key=lambda s: (s["score"], s["heldout_nll"]))


def export_schedule(model, layout: SourceLayout, config, rope: int, stats) -> LowRankConfig:
    """`config` with `rope_slot0` fixed for `rope` rotated dims (rorope-export only, when not given): the
    one second-components schedule for every layer that keeps the most score energy (rope.best_schedule).
    Schedules that skip frequencies (`--rope-skip`) are not chosen by energy: on SmolLM2 at 12.5 % the one
    keeping the most (a=1, s=4: 0.62 of the energy against 0.53) scored worse on held-out calibration text
    (NLL 5.917 against 5.795) and on WikiText-2 (ppl 514 against 440; BENCHMARKS.md "deploy"): the fast
    frequencies it skips weigh more than their energy. stats: per-layer InputStats, or None (weights alone)."""
    if getattr(config, "rope", None) != "rorope-export" or config.rope_slot0 is not None:
        return config
    strategy, energies = ROPE_STRATEGIES["rorope-export"], []
    for i, attn in enumerate(attention_layers(model)):
        sigma = None if stats is None else stats[i].blended(config.attn_moment).sigma
        energies.append(strategy.energy(read_attention(attn).at_least_float32(), layout.for_layer(i), sigma,
                                        config.rope_horizon))
    # engines run DeepSeek-V3 RoPE as plain or YaRN only: keep to the source's plain (unscaled) frequencies
    slot0, skip = best_schedule(energies, layout, rope // 2, most=plain_frequencies(model.config))
    return replace(config, rope_slot0=slot0, rope_skip=skip)
