"""The main job: convert the bundled SmolLM2 at a KV budget and show what it saves and costs."""

from __future__ import annotations

import logging
import time

import torch

from ..conversion.configs import ExactConfig, make_config
from ..conversion.dispatch import convert
from ..errors import LatentKVError
from ..evaluation.perplexity import perplexity
from ..io.atomic import check_output_dir
from ..io.text import load_text
from ..loading import load_model, parse_dtype, stored_dtype
from ..runtime.accounting import cache_report
from ..runtime.checkpoint import save

log = logging.getLogger(__name__)


def run_demo(kv_budget: float = 0.5, out: str | None = None, overwrite: bool = False, seq_len: int = 1024,
             max_windows: int = 4, text: str = "wikitext2", model: str = "smollm2-135m", progress: bool = True,
             dtype: torch.dtype | str = "auto") -> dict:
    """Source vs exact (100 %) vs calibrated budget conversion: cache bytes/token and perplexity, each
    evaluated in `dtype` ("auto": as the source is stored); the conversions compute in float32."""
    if out is not None:
        check_output_dir(out, overwrite)
    # built first, so a bad budget is one error line before any loading or output
    config, fallback = make_config(kv_budget=kv_budget, calib_samples=16), make_config(kv_budget=kv_budget, method="svd")
    t0 = time.perf_counter()
    source, tok = load_model(model, progress=progress)
    _note(f"loaded {model} in {time.perf_counter() - t0:.1f}s")
    try:
        corpus, why = load_text(text), None
    except LatentKVError as e:
        corpus, why = None, str(e)
    variants = [("source", source), ("MLA exact (100%)", convert(source, ExactConfig(), progress=progress))]
    try:  # a smaller calibration set than the library default keeps the demo short
        small = convert(source, config, tokenizer=tok, progress=progress)
        variants.append((f"MLA lowrank ({kv_budget:.0%})", small))
    except LatentKVError as e:  # no calibration text here: show the weight-only baseline instead
        _note(f"calibrated conversion unavailable ({e}); using the weight-SVD baseline")
        svd = convert(source, fallback, progress=progress)
        variants.append((f"MLA svd ({kv_budget:.0%})", svd))
    dtype = stored_dtype(model) if dtype == "auto" else parse_dtype(dtype)
    rows = []
    for name, m in variants:
        m.to(dtype)
        rep = cache_report(m)
        ppl = perplexity(m, tok, corpus, seq_len=seq_len, max_windows=max_windows, progress=progress) if corpus else None
        rows.append({"variant": name, "cache_values_per_token_per_layer": rep["model"]["values_per_token_per_layer"][0],
                     "cache_bytes_per_token": rep["model"]["bytes_per_token"], "ratio": rep["ratio"],
                     "ppl": None if ppl is None else ppl.ppl, "tokens": None if ppl is None else ppl.tokens,
                     "convert_seconds": (rep["record"] or {}).get("convert_seconds")})
    if out is not None:
        save(variants[-1][1], tok, out, overwrite=overwrite)
    record = variants[-1][1].config.latentkv
    return {"model": model, "dtype": str(dtype).removeprefix("torch."), "text": text, "calib": record["conversion"].get("calib"), "seq_len": seq_len, "max_windows": max_windows, "rows": rows,
            "ppl_missing_reason": why, "saved": out, "seconds": round(time.perf_counter() - t0, 1)}


def _note(msg: str) -> None:
    log.info(msg)
