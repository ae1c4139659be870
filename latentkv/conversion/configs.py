"""Conversion methods: each a frozen, versioned config; `conversion.dispatch.convert` looks up the
handler for its type. Configs serialise to the record (`config_to_dict`) and back (`config_from_dict`).

Budgets are in cache *values* per token per layer; the source caches `2 * G * d`. How a budget
becomes (kv_lora_rank, qk_rope_head_dim) is `conversion.dims`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from ..errors import LatentKVError
from ..io.text import check_not_test_split
from .metrics import FACTORIZERS
from .mixture import MIX
from .rope import ROPE_STRATEGIES

RANK_ALLOCATIONS = ("uniform", "sensitivity", "spectrum")
# (kv_lora_rank, qk_rope_head_dim) the fast MLA decode kernels take: FlashMLA (and CUTLASS MLA) need
# DeepSeek-V3's own 512 + 64; FlashInfer's MLA kernels also take 256 + 64. Other shapes fall back.
PRESETS = {"flashmla": (512, 64), "flashinfer": (256, 64)}


@dataclass(frozen=True)
class ExactConfig:
    """GQA/MHA embedded exactly as MLA (TransMLA, Thm. 1): every key dim keeps RoPE in the shared rope
    key (`qk_rope_head_dim = G*d`), the latent holds the values (`kv_lora_rank = G*d`).
    Same cache size as the source, same function; the starting point of every compression."""

    version: ClassVar[int] = 1
    method: ClassVar[str] = "exact"


def _check_budget(config) -> None:
    """Exactly one of: kv_budget, kv_values, or both explicit dims (a preset: its dims, and a budget
    may come with it as the cap it must fit)."""
    explicit = (config.kv_lora_rank, config.qk_rope_head_dim)
    preset = getattr(config, "preset", None)
    if preset is not None and PRESETS.get(preset) != explicit:
        raise LatentKVError(f"--preset {preset} sets the dims itself; drop --kv-lora-rank/--qk-rope-head-dim"
                            if preset in PRESETS else f"unknown --preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    given = [config.kv_budget is not None and preset is None, config.kv_values is not None, explicit != (None, None)]
    if sum(given) > 1:
        raise LatentKVError("give one of --kv-budget, --kv-values, or --kv-lora-rank with --qk-rope-head-dim")
    if config.kv_budget is not None and not 0.0 < config.kv_budget <= 1.0:
        raise LatentKVError(f"--kv-budget must be in (0, 1], got {config.kv_budget}; e.g. 0.5 halves the cache")
    if config.kv_values is not None and config.kv_values < 2:
        raise LatentKVError(f"--kv-values must be at least 2 (one rotated pair or latent dim), got {config.kv_values}")
    if given[2] and None in explicit:
        raise LatentKVError("--kv-lora-rank and --qk-rope-head-dim go together; give both")
    if not any(given):
        raise LatentKVError("give --kv-budget F, --kv-values N, or both --kv-lora-rank R and --qk-rope-head-dim D")


@dataclass(frozen=True)
class CacheSize:
    """How big the cache may be, for methods that compress: exactly one of `kv_budget` (a fraction of the
    source's cache values), `kv_values` (values per token per layer), or both explicit dims."""

    kv_budget: float | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    kv_values: int | None = None

    def __post_init__(self):
        _check_budget(self)


@dataclass(frozen=True)
class SVDConfig(CacheSize):
    """Weight-only baseline (MHA2MLA): keep RoPE on the highest frequencies of every KV head
    (S_high), joint SVD of the stacked non-rotated key and value weights for the latent.

    With a budget the rope side gets about a quarter of the values (MHA2MLA's split)."""

    version: ClassVar[int] = 1
    method: ClassVar[str] = "svd"


@dataclass(frozen=True)
class LowRankConfig(CacheSize):
    """Calibrated, training-free conversion: a RoPE strategy picks the rotated dims (`rope`, one of
    ROPE_STRATEGIES: high | 2norm | rorope | rorope-export | rorope-fold2 | rorope-fold4), a
    factorizer builds the latent (`factorizer`: svd | pca | output), statistics come from `calib`
    text (default: a mixture of domains, `conversion/mixture.py`; layer by layer through the already converted prefix when `sequential`). With a budget,
    the rope/latent split is searched on held-out calibration windows."""

    version: ClassVar[int] = 1
    method: ClassVar[str] = "lowrank"
    rope: str = "rorope"
    factorizer: str = "output"
    rope_horizon: int = 512  # distances over which dropped pairs are averaged; 0: drop as MHA2MLA does
    sequential: bool = False  # kept to compare with one-shot (BENCHMARKS.md, "design notes")
    attn_moment: float = 0.3  # weight of the attention-averaged input moment in the statistics (statistics.py)
    rank_allocation: str = "uniform"  # uniform | sensitivity: per-layer ranks (allocate.py), native format only
    latent_norm: bool = False  # fit the kv_a_layernorm stock DeepSeek-V3 engines apply (latent_norm.py)
    calib: str = MIX  # the domain mixture (mixture.py), or a text file or name
    calib_samples: int = 32
    calib_seq_len: int = 512
    preset: str | None = None  # a kernel-ready shape (PRESETS); its dims are kv_lora_rank/qk_rope_head_dim
    # rorope-export: how many rope pairs are first components (slot 0); the rest are second components of
    # the fastest frequencies (YaRN, factor < 1, in the export). None: chosen by kept energy over all layers
    rope_slot0: int | None = None
    # rorope-export: 0, or s > 0: the pairs after the first rope_slot0 are first components too, of the
    # frequencies after s skipped (YaRN, factor > 1, in the export); only when asked (search.export_schedule)
    rope_skip: int = 0
    # more RoPE strategies the split search tries at every candidate split; the lowest held-out score
    # becomes `rope` (make_config sets AUTO_ROPES when --rope is not given and the split is searched)
    rope_choices: tuple[str, ...] = ()
    # DiffQKV-style: separate key and value latents (one block each in kv_b_proj), their widths split by the
    # two spectra; the cache holds both (r = r_k + r_v). The joint latent is the default
    kv_separate: bool = False
    # One factor on every attention logit, folded into the queries (temperature.py): None chooses it on
    # calibration text at temperature_seq_len tokens (the context served); 1.0 leaves the logits as fitted
    attn_temperature: float | None = None
    head_temperatures: bool = True  # first fit two factors per head to the source's attention (temperature.py)
    temperature_seq_len: int = 2048
    # Refit every o_proj by least squares to the source's attention output (output_refit.py), on
    # refit_windows calibration windows of temperature_seq_len tokens walked through both models. Off by
    # default: on SmolLM2's 50 % export it took WikiText-2 from x1.659 to x1.520 but copying from 6.5 % to
    # 1.9 %, and it wrecked the 25 % one (x5.26 -> x17.7) (BENCHMARKS.md, "The output refit")
    output_refit: bool = False
    refit_windows: int = 16

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "rope_choices", tuple(self.rope_choices))  # a record's JSON list reads back equal
        for rope in (self.rope, *self.rope_choices):
            if rope not in ROPE_STRATEGIES:
                raise LatentKVError(f"unknown --rope {rope!r}; choose one of: {', '.join(ROPE_STRATEGIES)}")
        if self.factorizer not in FACTORIZERS:
            raise LatentKVError(f"unknown --factorizer {self.factorizer!r}; choose one of: {', '.join(FACTORIZERS)}")
        if not 0.0 <= self.attn_moment <= 1.0:
            raise LatentKVError(f"--attn-moment must be in [0, 1], got {self.attn_moment}")
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise LatentKVError(f"unknown --rank-allocation {self.rank_allocation!r}; choose one of: "
                                + ", ".join(RANK_ALLOCATIONS))
        check_not_test_split(self.calib)
        if self.rope_horizon < 0:
            raise LatentKVError(f"--rope-horizon must be >= 0 tokens, got {self.rope_horizon}")
        if self.rope_slot0 is not None and (self.rope != "rorope-export" or self.rope_slot0 < 1):
            raise LatentKVError(f"--rope-slot0 {self.rope_slot0} needs --rope rorope-export and at least 1")
        if self.rope_skip and (self.rope_slot0 is None or self.rope_skip < 0):
            raise LatentKVError(f"--rope-skip {self.rope_skip} needs --rope-slot0 (the pairs before the skip) and "
                                "a count >= 1")
        if self.attn_temperature is not None and not 0 < self.attn_temperature <= 10:
            raise LatentKVError(f"--attn-temperature must be auto or a factor in (0, 10], got {self.attn_temperature}")
        if self.temperature_seq_len < 16:
            raise LatentKVError(f"--temperature-seq-len must be >= 16 tokens, got {self.temperature_seq_len}")
        if self.refit_windows < 1:
            raise LatentKVError(f"--refit-windows must be >= 1, got {self.refit_windows}")
        if self.calib_samples < 1 or self.calib_seq_len < 16:
            raise LatentKVError("--calib-samples must be >= 1 and --calib-seq-len >= 16")


METHODS = {"exact": ExactConfig, "svd": SVDConfig, "lowrank": LowRankConfig}


def config_to_dict(config) -> dict:
    return {"method": config.method, "version": config.version, **asdict(config)}


def config_from_dict(data: dict):
    """The config a record's `conversion` entry describes; a one-line error for unknown methods or versions."""
    data = dict(data)
    method, version = data.pop("method", None), data.pop("version", None)
    cls = METHODS.get(method)
    if cls is None:
        raise LatentKVError(f"unknown conversion method {method!r} in checkpoint; known: {', '.join(METHODS)}")
    if version != cls.version:
        raise LatentKVError(f"checkpoint made with {method} config v{version}, this latentkv reads v{cls.version}; "
                            "re-run `latentkv convert` with this version")
    return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


TARGETS = {"deepseek_v3": {"rope": "rorope-export", "latent_norm": True, "rank_allocation": "uniform"}}


def export_grade(config) -> bool:
    """A conversion made for the DeepSeek-V3 export (`--target deepseek_v3`, `--latent-norm` or
    `--rope rorope-export`): what stock engines compute, so nothing only our runtime can hold."""
    return bool(getattr(config, "latent_norm", False)) or getattr(config, "rope", None) == "rorope-export"
# Native conversions without --rope: the split search also tries folding neighbouring frequencies,
# which kept more score energy at low budgets; held-out calibration windows decide per budget.
AUTO_ROPES = ("rorope", "rorope-fold2")


def make_config(kv_budget: float | None = None, kv_lora_rank: int | None = None,
                qk_rope_head_dim: int | None = None, method: str | None = None, kv_values: int | None = None,
                target: str | None = None, preset: str | None = None, **lowrank):
    """CLI flags -> config. No budget (or budget 1) and no method: the exact embedding; a smaller
    budget: the calibrated `lowrank` method unless `method` says otherwise. `lowrank` takes the
    LowRankConfig fields (rope, factorizer, sequential, attn_moment, rank_allocation, calib,
    calib_samples, calib_seq_len, latent_norm, rope_horizon). `target="deepseek_v3"` makes every
    choice the DeepSeek-V3 export can express (rope rorope-export, a fitted latent norm, uniform ranks).
    `preset` (PRESETS) fixes kernel-ready dims and implies that target; a budget given with it is a cap."""
    if preset is not None:
        if preset not in PRESETS:
            raise LatentKVError(f"unknown --preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        if (kv_lora_rank, qk_rope_head_dim, kv_values) != (None, None, None):
            raise LatentKVError(f"--preset {preset} sets the dims itself; drop --kv-lora-rank/--qk-rope-head-dim/--kv-values")
        (kv_lora_rank, qk_rope_head_dim), target = PRESETS[preset], target or "deepseek_v3"
        lowrank = {**lowrank, "preset": preset}
    if target is not None:
        lowrank = _for_target(target, method, lowrank)
        method = "lowrank"
    if method not in (None, *METHODS):
        raise LatentKVError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    sized = dict(kv_budget=kv_budget, kv_values=kv_values, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim)
    full = kv_lora_rank is None and qk_rope_head_dim is None and kv_values is None and kv_budget in (None, 1.0)
    if method == "exact" or (method is None and full and target is None):
        if not full:
            raise LatentKVError("--method exact keeps the full cache; drop --kv-budget/--kv-values/--kv-lora-rank")
        return ExactConfig()
    if method == "svd":
        return SVDConfig(**sized)
    searched = kv_lora_rank is None and qk_rope_head_dim is None
    if searched and target is None and lowrank.get("rope") is None and "rope_choices" not in lowrank:
        lowrank = {**lowrank, "rope": AUTO_ROPES[0], "rope_choices": AUTO_ROPES[1:]}
    return LowRankConfig(**sized, **{k: v for k, v in lowrank.items() if v is not None})


def _for_target(target: str, method: str | None, lowrank: dict) -> dict:
    if target not in TARGETS:
        raise LatentKVError(f"unknown --target {target!r}; choose one of: {', '.join(TARGETS)}")
    if method not in (None, "lowrank"):
        raise LatentKVError(f"--target {target} converts with the lowrank method; drop --method {method}")
    out = dict(lowrank)
    for key, value in TARGETS[target].items():
        if out.get(key) not in (None, value):
            flag = "--" + key.replace("_", "-")
            raise LatentKVError(f"--target {target} needs {flag} {value} (got {out[key]}); drop {flag}")
        out[key] = value
    return out
