"""`latentkv sweep`: every method at every budget, evaluated the same way, as JSON, Markdown and a plot.

Calibration windows and one-shot statistics are computed once and shared by every run.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..conversion.allocate import layer_spectra, tail_share
from ..conversion.calibration import calibration_ids, oneshot_stats
from ..conversion.configs import LowRankConfig, make_config
from ..conversion.dispatch import convert
from ..errors import LatentKVError
from ..evaluation.passkey import passkey
from ..evaluation.perplexity import perplexity
from ..families import source_layout
from ..io.atomic import atomic_output_dir
from ..io.plots import figure, plot_title, readable_log_axes
from ..io.text import load_text
from ..runtime.accounting import cache_report


def run_sweep(model, tokenizer, budgets, methods, text: str, seq_len: int = 2048, max_windows: int | None = None,
              passkey_contexts=(), progress: bool = True, dtype: torch.dtype | None = None, **lowrank) -> dict:
    """-> {"source": row, "rows": [row per (method, budget)]}; row keys: method, budget, kv_lora_rank,
    qk_rope_head_dim, cache_values_per_token_per_layer, cache_bytes_per_token, ppl, ppl_ratio, tokens,
    windows, convert_seconds (+ passkey_accuracy; + latent_energy, latent_error_share per layer for
    calibrated rows). `dtype`: every row is evaluated in it (cache bytes too); conversions still compute
    from `model` as given (load it in float32), so only the deployed precision changes."""
    corpus = load_text(text)
    dtype = dtype or next(model.parameters()).dtype
    shown = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    source = evaluate_row(shown, tokenizer, corpus, seq_len, max_windows, passkey_contexts, progress)
    del shown
    source.update(method="source", budget=1.0, convert_seconds=None)
    ids, cache, rows = None, {}, []
    for method in methods:
        for budget in budgets:
            config = make_config(kv_budget=budget, method=None if budget == 1 else method, **lowrank)
            if isinstance(config, LowRankConfig) and ids is None:
                ids, _ = calibration_ids(tokenizer, config)
            if any(r["method"] == config.method and r["budget"] == budget for r in rows):
                continue  # budget 1 is the exact embedding whatever the method
            start = time.perf_counter()
            conv = convert(model, config, tokenizer=tokenizer, calib_ids=ids, calib_cache=cache, progress=progress)
            row = evaluate_row(conv.to(dtype), tokenizer, corpus, seq_len, max_windows, passkey_contexts, progress)
            row.update(method=config.method, budget=budget, convert_seconds=round(time.perf_counter() - start, 1))
            row["ppl_ratio"] = row["ppl"] / source["ppl"]
            if isinstance(config, LowRankConfig):
                row.update(latent_spectra(model, conv, config, ids, cache))
            rows.append(row)
    return {"source": source, "rows": rows, "text": text, "seq_len": seq_len, "max_windows": max_windows,
            "model": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
            "dtype": str(dtype).removeprefix("torch.")}


def latent_spectra(model, conv, config, ids, cache: dict) -> dict:
    """Per layer of a calibrated conversion: the weighted latent problem's energy per latent dim
    (s_k^2 / sum s^2, `conversion.linalg.spectrum`) and the share its rank leaves out."""
    dims = [layer.self_attn.dims for layer in conv.model.layers]
    spectra = layer_spectra(model, source_layout(model.config), config, dims[0].qk_rope_head_dim,
                            oneshot_stats(model, ids, cache, attention=config.attn_moment > 0))
    energy = [(s.double() ** 2 / (s.double() ** 2).sum()) for s in spectra]
    return {"latent_energy": [[round(float(v), 6) for v in e] for e in energy],
            "latent_error_share": [round(tail_share(s, d.kv_lora_rank), 6) for s, d in zip(spectra, dims)]}


def evaluate_row(model, tokenizer, corpus: str, seq_len: int, max_windows, passkey_contexts=(), progress=True,
                 trials: int = 3) -> dict:
    """Cache size, perplexity (and passkey accuracy) of one model, as one table row."""
    rep = cache_report(model)
    ppl = perplexity(model, tokenizer, corpus, seq_len=seq_len, max_windows=max_windows, progress=progress)
    layers = (rep["record"] or {}).get("layers", [{}])
    values = rep["model"]["values_per_token_per_layer"]
    row = {"kv_lora_rank": _mean(d.get("kv_lora_rank") for d in layers),
           "qk_rope_head_dim": _mean(d.get("qk_rope_head_dim") for d in layers),
           "cache_values_per_token_per_layer": _mean(values),
           "cache_bytes_per_token": rep["model"]["bytes_per_token"], "ppl": ppl.ppl, "tokens": ppl.tokens,
           "windows": ppl.windows, "ppl_ratio": 1.0}
    if passkey_contexts:
        row["passkey_accuracy"] = passkey(model, tokenizer, contexts=passkey_contexts, trials=trials,
                                          progress=progress)["accuracy"]
    return row


def _mean(values):
    """One number for per-layer dims: the common value, or the mean when layers differ (rank allocation)."""
    values = list(values)
    if None in values:
        return None
    return values[0] if len(set(values)) == 1 else round(sum(values) / len(values), 1)


def markdown(result: dict, command: str) -> str:
    head = ("| method | budget | rope + latent | cache values/token/layer | cache bytes/token | ppl | ratio | "
            "windows | convert s |")
    lines = [f"Command: `{command}`  ", f"Text {result['text']}, seq_len {result['seq_len']}, "
             f"{result['source']['windows']} windows ({result['source']['tokens']:,} tokens).", "", head,
             "|" + "---|" * 9]
    for r in [result["source"], *result["rows"]]:
        split = f"{r['qk_rope_head_dim']} + {r['kv_lora_rank']}" if r["kv_lora_rank"] else "-"
        lines.append(f"| {r['method']} | {r['budget']:g} | {split} | {r['cache_values_per_token_per_layer']} | "
                     f"{r['cache_bytes_per_token']:,} | {r['ppl']:.3f} | {r['ppl_ratio']:.3f} | {r['windows']} | "
                     f"{r['convert_seconds'] if r['convert_seconds'] is not None else '-'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Perplexity vs cache bytes per token, one line per method, the source as a reference point."""
    with figure(path, figsize=(6.5, 4.4), title=plot_title(result.get("model", "model"), result.get("dtype", "float32"))) as (_, ax):
        _plot_ppl(ax, result)


def _plot_ppl(ax, result: dict) -> None:
    exact = [(r["cache_bytes_per_token"], r["ppl"]) for r in result["rows"] if r["method"] == "exact"]
    for method in dict.fromkeys(r["method"] for r in result["rows"] if r["method"] != "exact"):
        # every method reaches the exact embedding at full budget, so its line ends there
        pts = sorted(exact + [(r["cache_bytes_per_token"], r["ppl"]) for r in result["rows"] if r["method"] == method])
        ax.plot(*zip(*pts), marker="o", label=method)
    src = result["source"]
    ax.scatter([src["cache_bytes_per_token"]], [src["ppl"]], marker="*", s=150, color="k", label="source", zorder=3)
    ax.set(xlabel="KV cache bytes per token (all layers)", ylabel=f"perplexity ({Path(result['text']).name})",
           yscale="log", title="perplexity vs KV cache")
    ax.grid(alpha=0.3)
    readable_log_axes(ax)
    ax.legend()


def plot_spectra(result: dict, path: Path) -> bool:
    """Left: share of each layer's weighted latent energy kept vs rank (one curve per layer, the
    best-split rope dims of the largest compressed budget). Right: share left out per layer, one
    line per budget. False when the sweep has no calibrated rows."""
    rows = [r for r in result["rows"] if "latent_energy" in r]
    if not rows:
        return False
    title = plot_title(result.get("model", "model"), result.get("dtype", "float32"))
    with figure(path, ncols=2, figsize=(11, 4.4), title=title) as (plt, (left, right)):
        _plot_spectra(plt, left, right, rows)
    return True


def _plot_spectra(plt, left, right, rows: list[dict]) -> None:
    top = max(rows, key=lambda r: r["budget"])
    layers = top["latent_energy"]
    for i, e in enumerate(layers):
        left.plot(np.arange(1, len(e) + 1), np.cumsum(e), color=plt.cm.viridis(i / max(1, len(layers) - 1)), lw=1)
    for r in rows:
        left.axvline(r["kv_lora_rank"], color="grey", ls=":", lw=1)
        right.plot(r["latent_error_share"], marker=".", label=f"budget {r['budget']:g} (r={r['kv_lora_rank']})")
    left.set(xlabel="latent rank", ylabel="weighted energy kept", xscale="log",
             title=f"per-layer spectra, rope {top['qk_rope_head_dim']} (dark: first layer)")
    right.set(xlabel="layer", ylabel="weighted error share left out", yscale="log", title="reconstruction error")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        readable_log_axes(ax)
    right.legend()


def write_sweep(result: dict, out: str | Path, command: str, overwrite: bool = False) -> Path:
    if not result["rows"]:
        raise LatentKVError("the sweep produced no rows; give --budgets and --methods")
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2))
        (tmp / "sweep.md").write_text(markdown(result, command))
        plot(result, tmp / "ppl_vs_cache.png")
        plot_spectra(result, tmp / "latent_spectra.png")
    return Path(out)
