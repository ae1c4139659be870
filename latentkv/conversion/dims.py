"""The one rule from a cache budget to (kv_lora_rank, qk_rope_head_dim): used by `convert`, by the
split search, by streaming and by rank allocation.

A budget counts cache values per token per layer (`kv_lora_rank + qk_rope_head_dim`); the source
caches `2 * G * d`. The rotated key takes whole pairs on the grid its RoPE strategy allows
(`rope_grid`); the latent takes the rest, capped at the rank of the stacked non-rotated keys and
values (`max_rank`), since wider latents would only store zeros.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ..errors import LatentKVError
from ..families import SourceLayout
from .configs import PRESETS, ExactConfig, SVDConfig, export_grade
from .rope import PER_HEAD

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2)  # rope shares the split search tries
# The rope share a streaming conversion takes, since it never holds the whole model to search: the
# share the search picked most often on SmolLM2 (BENCHMARKS.md, "quality").
STREAM_SPLIT = 3 / 8


def budget_values(config, layout: SourceLayout) -> int | None:
    """Cache values per token per layer the config leaves for kv_lora_rank + qk_rope_head_dim; None when
    dims are explicit (or exact). A QK-norm source's key scales (`layout.key_scales`) count in it."""
    if getattr(config, "kv_budget", None) is not None:
        return round(config.kv_budget * layout.kv_values_per_token) - layout.key_scales
    if getattr(config, "kv_values", None) is not None:
        if config.kv_values > layout.kv_values_per_token:
            raise LatentKVError(f"--kv-values {config.kv_values} exceeds the source's {layout.kv_values_per_token} "
                                "cache values per token per layer")
        return config.kv_values - layout.key_scales
    return None


def fit_to_source(config, layout: SourceLayout):
    """`config` as the source can take it. QK-norm: each KV head's key is scaled by its own per-token
    1 / rms, so a RoPE strategy that mixes KV heads (RoRoPE) would mix differently scaled keys: the
    default then chooses among those that keep heads apart; an explicit one is refused. A DeepSeek-V3
    export has no slot for the scale, nor for layers without RoPE (SmolLM3): export-grade is refused."""
    rope, for_export = rope_of(config), export_grade(config)
    if for_export and layout.layer_inv_freq and not all(any(f) for f in layout.layer_inv_freq):
        raise LatentKVError(f"cannot convert {layout.model_type} export-grade (--target deepseek_v3): its NoPE layers "
                            "rotate nothing, while DeepSeek-V3 rotates a rope key in every layer with one shape; "
                            "convert without --target and serve with latentkv's runtime")
    if layout.qk_norm is None:
        return config
    if for_export:
        raise LatentKVError(f"cannot convert {layout.model_type} export-grade (--target deepseek_v3): its QK-norm "
                            "scales every key by a per-token 1/rms that DeepSeek-V3 engines cannot express; convert "
                            "without --target and serve with latentkv's runtime (the scales are cached beside c_kv)")
    if layout.qk_norm != "head" or layout.num_kv_heads == 1 or not rope.startswith("rorope"):
        return config
    if getattr(config, "rope_choices", ()):
        log.info("QK-norm with %d KV heads: RoRoPE would mix differently scaled keys; using --rope 2norm",
                 layout.num_kv_heads)
        return replace(config, rope="2norm", rope_choices=())
    raise LatentKVError(f"--rope {rope} mixes KV heads, but {layout.model_type}'s QK-norm scales each KV head's key "
                        "by its own per-token factor, so the mix would not be exact; use --rope 2norm or --rope high")


def rope_of(config) -> str:
    """The RoPE strategy a config's rotated dims follow (exact and svd keep whole pairs per KV head)."""
    return getattr(config, "rope", "high")


def max_rank(layout: SourceLayout, rope: int, shared_nope: bool) -> int:
    """Rank of [K_nope; V]: rows of the stack, capped by the input width (hidden size + bias)."""
    g, d = layout.num_kv_heads, layout.head_dim
    nope_rows = g * d - rope if shared_nope else g * (d - rope // g)
    return min(nope_rows + g * d, layout.hidden_size)


def latent_cap(layout: SourceLayout, rope_strategy: str, rope: int) -> int:
    """The widest useful latent next to `rope` rotated dims under a RoPE strategy."""
    return max_rank(layout, rope, shared_nope=rope_strategy not in PER_HEAD)


def rope_grid(layout: SourceLayout, rope: str) -> tuple[int, int]:
    """(step, most) for qk_rope_head_dim under a RoPE strategy: S_high keeps pairs uniformly per KV head,
    the export-compatible RoRoPE at most two components per frequency (rope.export_kept), the others any pair."""
    g, d = layout.num_kv_heads, layout.head_dim
    if rope in PER_HEAD:
        return 2 * g, g * d
    return {"rorope-export": (2, min(g, 2) * d)}.get(rope, (2, g * d))


def fixed_dims(config, layout: SourceLayout) -> tuple[int, int] | None:
    """(kv_lora_rank, qk_rope_head_dim) a config fixes by itself; None: a calibrated split search decides."""
    full = layout.num_kv_heads * layout.head_dim
    if isinstance(config, ExactConfig):
        return full, full
    if getattr(config, "preset", None):
        return config.kv_lora_rank, config.qk_rope_head_dim
    values = budget_values(config, layout)
    if values is None:
        return config.kv_lora_rank, config.qk_rope_head_dim
    if isinstance(config, SVDConfig):
        return quarter_split(layout, values)
    return None


def quarter_split(layout: SourceLayout, values: int) -> tuple[int, int]:
    """MHA2MLA's split: about a quarter of the values to S_high's rope pairs, the rest to the latent."""
    g, d = layout.num_kv_heads, layout.head_dim
    rope = 2 * g * min(d // 2, max(1, round(values / 4 / (2 * g))))
    if values - rope < 1:
        raise LatentKVError(f"{values} cache values per token are too few for {rope} rope dims plus a latent; "
                            f"use a budget >= {(rope + 1) / layout.kv_values_per_token:.3f}")
    return min(values - rope, latent_cap(layout, "high", rope)), rope


def split_at(layout: SourceLayout, rope_strategy: str, values: int, frac: float) -> tuple[int, int]:
    """(kv_lora_rank, qk_rope_head_dim) giving about `frac` of `values` to the rotated key."""
    step, most_rope = rope_grid(layout, rope_strategy)
    p = min(most_rope, max(step, step * round(values * frac / step)))
    return min(values - p, latent_cap(layout, rope_strategy, p)), p


def candidate_splits(layout: SourceLayout, rope_strategy: str, values: int) -> list[tuple[int, int]]:
    """(kv_lora_rank, qk_rope_head_dim) pairs worth trying for `values` cache values."""
    out = []
    for frac in SPLIT_FRACTIONS:
        r, p = split_at(layout, rope_strategy, values, frac)
        if r >= 1 and (r, p) not in out:
            out.append((r, p))
    if not out:
        raise LatentKVError(f"{values} cache values per token cannot hold a rotated pair and a latent; raise the budget")
    return out


def check_dims(layout: SourceLayout, kv_lora_rank: int, qk_rope_head_dim: int, rope: str = "high") -> None:
    """One-line errors for ranks that cannot fit this model under the given RoPE strategy."""
    p, r = qk_rope_head_dim, kv_lora_rank
    step, most_rope = rope_grid(layout, rope)
    if p < 0 or p % step or p > most_rope:
        what = f"a multiple of 2*num_key_value_heads (= {step})" if step > 2 else "even"
        raise LatentKVError(f"--qk-rope-head-dim {p} does not fit: with --rope {rope} it must be {what}, "
                            f"between 0 and {most_rope}")
    most = latent_cap(layout, rope, p)
    if not 1 <= r <= most:
        raise LatentKVError(f"--kv-lora-rank {r} does not fit: with --qk-rope-head-dim {p} it must be between 1 and "
                            f"{most} (rank of the stacked non-rotated keys and values)")


def checked(config, layout: SourceLayout, dims: tuple[int, int]) -> tuple[int, int]:
    """`dims` after `check_dims` (the exact embedding fits any model by construction)."""
    if not isinstance(config, ExactConfig):
        check_dims(layout, *dims, rope=rope_of(config))
    return dims


def check_config(config, layout: SourceLayout) -> None:
    """Every limit that depends only on the config and the source's shapes, checked before calibration
    (minutes) rather than after it: fixed dims fit, a budget leaves room for a rotated pair and a latent."""
    if getattr(config, "preset", None):
        check_preset(config, layout)
    dims = fixed_dims(config, layout)
    if dims is not None:
        checked(config, layout, dims)
    elif (values := budget_values(config, layout)) is not None:
        candidate_splits(layout, rope_of(config), values)


def check_preset(config, layout: SourceLayout) -> None:
    """A kernel-ready preset must shrink the source's cache and fit a --kv-budget given with it."""
    (r, p), name = PRESETS[config.preset], config.preset
    src, asked = layout.kv_values_per_token, budget_values(config, layout)
    others = ", ".join(f"{k} ({a}+{b})" for k, (a, b) in PRESETS.items() if a + b < r + p)
    if r + p >= src:
        raise LatentKVError(f"--preset {name} caches {r}+{p} = {r + p} values per token per layer, but the source caches "
                            f"{src} ({layout.num_kv_heads} KV heads x {layout.head_dim} dims x 2): it saves nothing; "
                            + (f"use --preset {others}" if others else "use --kv-budget without a preset"))
    if asked is not None and r + p > asked:
        raise LatentKVError(f"--preset {name} caches {r + p} values per token per layer, more than the {asked} that "
                            f"--kv-budget {config.kv_budget} allows; raise the budget or use a smaller preset")
    if asked is not None and r + p < asked:
        log.warning("--preset %s caches %d values per token per layer, below the %d that --kv-budget %s allows "
                    "(a smaller cache than asked, for the kernel's shape)", name, r + p, asked, config.kv_budget)


def stream_dims(layout: SourceLayout, config) -> tuple[int, int]:
    """The dims of a streaming conversion: fixed ones, else the STREAM_SPLIT share of the budget."""
    check_config(config, layout)
    dims = fixed_dims(config, layout)
    if dims is None:
        dims = split_at(layout, rope_of(config), budget_values(config, layout), STREAM_SPLIT)
        log.info("streaming: rope %d + latent %d (the split search needs the whole model; pass "
                 "--kv-lora-rank and --qk-rope-head-dim to choose)", dims[1], dims[0])
    return checked(config, layout, dims)

