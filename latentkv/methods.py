"""Conversion methods: each a frozen, versioned config. `convert.py` dispatches on the type.

Budgets are in cache *values* per token per layer; the source caches `2 * G * d`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from .errors import LatentKVError
from .families import SourceLayout


@dataclass(frozen=True)
class ExactConfig:
    """GQA/MHA embedded exactly as MLA (TransMLA, Thm. 1; notes §1): every key dim keeps RoPE in the
    shared rope key (`qk_rope_head_dim = G*d`), the latent holds the values (`kv_lora_rank = G*d`).
    Same cache size as the source, same function; the starting point of every compression."""

    version: ClassVar[int] = 1
    method: ClassVar[str] = "exact"

    def dims(self, layout: SourceLayout) -> tuple[int, int]:
        """-> (kv_lora_rank, qk_rope_head_dim)."""
        full = layout.num_kv_heads * layout.head_dim
        return full, full


@dataclass(frozen=True)
class SVDConfig:
    """Weight-only baseline (MHA2MLA): keep RoPE on the highest frequencies of every KV head
    (S_high), joint SVD of the stacked non-rotated key and value weights for the latent.

    Give either `kv_budget` (fraction of the source's cache values) or both explicit dims.
    With a budget the rope side gets about a quarter of the values (MHA2MLA's split)."""

    version: ClassVar[int] = 1
    method: ClassVar[str] = "svd"
    kv_budget: float | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None

    def __post_init__(self):
        explicit = (self.kv_lora_rank, self.qk_rope_head_dim)
        if self.kv_budget is not None:
            if explicit != (None, None):
                raise LatentKVError("give either --kv-budget or --kv-lora-rank with --qk-rope-head-dim, not both")
            if not 0.0 < self.kv_budget <= 1.0:
                raise LatentKVError(f"--kv-budget must be in (0, 1], got {self.kv_budget}; e.g. 0.5 halves the cache")
        elif None in explicit:
            raise LatentKVError("give --kv-budget F, or both --kv-lora-rank R and --qk-rope-head-dim D")

    def dims(self, layout: SourceLayout) -> tuple[int, int]:
        g, d = layout.num_kv_heads, layout.head_dim
        if self.kv_budget is None:
            return self.kv_lora_rank, self.qk_rope_head_dim
        values = round(self.kv_budget * layout.kv_values_per_token)
        pairs_per_head = min(d // 2, max(1, round(values / 4 / (2 * g))))
        rope = 2 * g * pairs_per_head
        if values - rope < 1:
            raise LatentKVError(f"--kv-budget {self.kv_budget} leaves {values} cache values per token, too few for "
                                f"{rope} rope dims plus a latent; use a budget >= {(rope + 1) / layout.kv_values_per_token:.3f}")
        # MHA sources can have more cache values than hidden dims: a latent wider than the rank of
        # [K_nope; V] (at most the hidden size) would only store zeros, so the budget caps there.
        most = min(g * (2 * d - rope // g), layout.hidden_size)
        return min(values - rope, most), rope


METHODS = {"exact": ExactConfig, "svd": SVDConfig}


def config_to_dict(config) -> dict:
    return {"method": config.method, "version": config.version, **asdict(config)}


def config_from_dict(data: dict):
    data = dict(data)
    method, version = data.pop("method", None), data.pop("version", None)
    cls = METHODS.get(method)
    if cls is None:
        raise LatentKVError(f"unknown conversion method {method!r} in checkpoint; known: {', '.join(METHODS)}")
    if version != cls.version:
        raise LatentKVError(f"checkpoint made with {method} config v{version}, this latentkv reads v{cls.version}; "
                            "re-run `latentkv convert` with this version")
    return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def make_config(kv_budget: float | None = None, kv_lora_rank: int | None = None,
                qk_rope_head_dim: int | None = None, method: str | None = None):
    """CLI flags -> config. No budget, or budget 1, without a method means the exact embedding."""
    if method not in (None, *METHODS):
        raise LatentKVError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    if method == "exact" or (method is None and kv_lora_rank is None and qk_rope_head_dim is None
                             and kv_budget in (None, 1.0)):
        if kv_lora_rank is not None or qk_rope_head_dim is not None or kv_budget not in (None, 1.0):
            raise LatentKVError("--method exact keeps the full cache; drop --kv-budget/--kv-lora-rank/--qk-rope-head-dim")
        return ExactConfig()
    return SVDConfig(kv_budget=kv_budget, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim)
