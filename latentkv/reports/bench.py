"""`latentkv bench`: prefill time, decode speed, memory and cache bytes of a source model and its
MLA conversion, side by side, with the bandwidth floor each decode step could reach.

Per model and context: one batch-1 prefill is timed (chunked, so attention memory stays bounded),
then its cache is repeated to each batch size and `new_tokens` decode steps are timed for each
variant; the median step gives decode tokens/s. Variants: `source` (transformers' DynamicCache, its own
attention kernel), `source-static` (its StaticCache), `latent-expanded` (latent cache, keys/values
decompressed every step) and `latent-absorbed` (latent cache, absorbed decode); with `compile`, the
source rows and the absorbed one again with the step through torch.compile (`-compiled`; its warm-up
runs on a copy of the cache, so such a row holds the cache twice while it warms up). A step must at
least read the weights once and the whole cache once: `floor_s = step_bytes / bandwidth`, with the
bandwidth measured by a streaming read at the start of the run.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StaticCache

from ..errors import LatentKVError
from ..io.atomic import atomic_output_dir
from ..io.machine import available_memory, peak_rss, reset_peak_rss
from ..io.plots import figure, plot_title, readable_log_axes
from ..record import record_of
from ..runtime.accounting import cache_report
from ..runtime.cache import LatentCache
from ..runtime.generation import cache_tensor_bytes, compiled_decoder, decode_n_tokens, new_cache, prefill
from ..runtime.install import mla_layers
from ..runtime.quant import CacheFormat, as_format

PREFILL_CHUNK = 1024  # tokens per prefill forward: bounds the (chunk x context) attention scores
HEADROOM = 0.8  # share of MemAvailable a row may plan to use
COMPILED = "-compiled"  # a variant's suffix when its decode step runs through `compiled_decoder`


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a sum over a buffer larger than any cache), median of repeats."""
    buf = torch.ones(megabytes * 2 ** 20 // 4)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(times)


def measure_flops(n: int = 1536, repeats: int = 3) -> float:
    """fp32 FLOP/s of a square matmul on all threads (the compute roof), median of repeats."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, caches
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def step_flops(model, variant: str, batch: int, context: int) -> int:
    """Multiply-adds x 2 of one decode step: every weight once per sequence, plus attention over
    `context` cached tokens (absorbed MLA attends in r + p dims and reads values in r, which is
    why it costs more FLOPs per cached token than GQA while reading fewer bytes)."""
    size = next(model.parameters()).element_size()
    total = 2 * batch * step_weight_bytes(model, variant) // size
    layers = mla_layers(model)
    if not layers:
        cfg = model.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return total + cfg.num_hidden_layers * 2 * batch * cfg.num_attention_heads * context * 2 * d
    for m in layers:
        d = m.dims
        if variant == "latent-absorbed":
            total += 2 * batch * d.num_heads * context * (2 * d.kv_lora_rank + d.qk_rope_head_dim)
        else:  # decompress every cached latent, then attend per head
            kv = d.num_heads * (d.qk_nope_head_dim + d.v_head_dim)
            total += 2 * batch * context * (d.kv_lora_rank * kv + d.num_heads * (kv + d.qk_rope_head_dim))
    return total


def weight_bytes(model) -> int:
    """Bytes a decode step reads from the weights: every parameter once (tied ones once); the
    embedding table counts once, as the tied or separate lm_head reads all of it."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def step_weight_bytes(model, variant: str) -> int:
    """Weight bytes a decode step of `variant` reads: everything, except that the absorbed path reads
    each MLA layer's pre-folded decode weights instead of its projections (`decode_weight_bytes`)."""
    total = weight_bytes(model)
    if variant == "latent-absorbed":
        for m in mla_layers(model):
            total += m.decode_weight_bytes() - sum(p.numel() * p.element_size() for p in m.parameters())
    return total


def cache_bytes_per_token(model, cache_dtype: str | CacheFormat = "model") -> int:
    """Cache bytes one token of one sequence occupies: latent for converted models (in `cache_dtype`),
    K/V otherwise."""
    if record_of(model) is not None:
        return LatentCache(model, cache_dtype=cache_dtype).bytes_per_token()
    return cache_report(model)["model"]["bytes_per_token"]


def plan(model, context: int, batch: int, new_tokens: int, dynamic: bool, cache_dtype="model") -> str | None:
    """Why this row cannot run here, or None."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and context + new_tokens > limit:
        return f"context {context} + {new_tokens} new tokens exceeds the model's {limit} positions"
    cache = cache_bytes_per_token(model, cache_dtype) * batch * (context + new_tokens) * (2 if dynamic else 1)  # cat copies
    heads = model.config.num_attention_heads
    scores = 4 * heads * PREFILL_CHUNK * (context + new_tokens) * 3  # fp32 scores, softmax, grads-free temps
    need = cache + scores  # the weights are already resident
    free = available_memory()
    if free is None:
        raise LatentKVError("cannot read MemAvailable from /proc/meminfo (Linux only), which bench plans rows by")
    if need > HEADROOM * free:
        return f"needs ~{need / 2 ** 30:.1f} GiB, more than {HEADROOM:.0%} of the {free / 2 ** 30:.1f} GiB free"
    return None


def variants(model, against=None, compile: bool = False) -> list[tuple[str, object]]:
    """(variant name, model) pairs; `compile` adds a compiled twin of every variant but latent-expanded
    (the slow reference path)."""
    if record_of(model) is None:
        if against is not None:
            raise LatentKVError("bench MODEL --against SOURCE: MODEL must be a latentkv conversion")
        out = [("source", model), ("source-static", model)]
    else:
        out = ([("source", against), ("source-static", against)] if against is not None else []) + [
            ("latent-expanded", model), ("latent-absorbed", model)]
    twins = [(n + COMPILED, m) for n, m in out if n != "latent-expanded"] if compile else []
    return out + twins


def base_variant(name: str) -> str:
    """`source-static-compiled` -> `source-static`: the path and the bytes and FLOPs a step reads."""
    return name.removesuffix(COMPILED)


# variant -> mla_path; `source` decodes over transformers' DynamicCache, `source-static` over its StaticCache
# (preallocated, no per-step concatenation): the fair baseline is the faster of the two
MLA_PATHS = {"source": None, "source-static": None, "latent-expanded": "expanded", "latent-absorbed": "auto"}
SOURCE_VARIANTS = ("source", "source-static")


def decode(model, cache, batch: int, context: int, steps: int, vocab: int, name: str = "source") -> list[float]:
    """`steps` one-token forwards of random tokens after `context` cached tokens with variant `name`'s
    path -> seconds per step. A compiled variant first runs the same steps untimed on a copy of the cache, so
    every graph they need (the first length, one dynamic in length, a cache filled to capacity) is compiled
    before the timed run."""
    gen, device = torch.Generator().manual_seed(1), next(model.parameters()).device
    choose = lambda _: torch.randint(0, vocab, (batch,), generator=gen).to(device)  # noqa: E731 - any tokens do
    pos, path = torch.full((batch, 1), context - 1, device=device), MLA_PATHS[base_variant(name)]
    if not name.endswith(COMPILED):
        return decode_n_tokens(model, cache, None, pos, steps, choose, mla_path=path)
    # Every compiled row traces the same function, and dynamo's per-function recompile limit (8) would be
    # spent by the first few rows of a run, after which steps silently run eager: each row compiles afresh,
    # and running past the limit is an error rather than a mislabelled eager row.
    torch.compiler.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        step_fn = compiled_decoder(model)
        decode_n_tokens(model, copy.deepcopy(cache), None, pos, steps, choose, mla_path=path, step_fn=step_fn)
        return decode_n_tokens(model, cache, None, pos, steps, choose, mla_path=path, step_fn=step_fn)


def measure(model, names: list[str], context: int, batches, new_tokens: int, roofs: tuple[float, float],
            seed: int = 0, cache_dtype: str | CacheFormat = "model") -> list[dict]:
    """Rows for one model at one context: one batch-1 prefill (the model's own path choice), then decode
    at each batch size for each variant name (see `variants`); a
    converted model's latents stored as `cache_dtype` (a quantized cache grows instead of preallocating)."""
    source = all(base_variant(n) in SOURCE_VARIANTS for n in names)
    fmt = CacheFormat() if source else as_format(cache_dtype)
    rows, dynamic, cache_dtype = [], source or fmt.quantized, fmt
    reasons = {b: plan(model, context, b, new_tokens, dynamic, cache_dtype) for b in batches}
    if all(reasons.values()):
        return [{"variant": n, "context": context, "batch": b, "skipped": reasons[b]} for n in names for b in batches]
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)
    prefilled: dict[str, tuple] = {}  # cache kind -> (prefilled cache, prefill seconds)
    for name in names:
        kind = "static" if base_variant(name) == "source-static" else "own"
        if kind not in prefilled:
            prefilled[kind] = prefilled_cache(model, ids, context + new_tokens, cache_dtype, kind)
        first, prefill_s = prefilled[kind]
        for b in batches:
            if reasons[b]:
                rows.append({"variant": name, "context": context, "batch": b, "skipped": reasons[b]})
                continue
            cache = copy.deepcopy(first)
            if b > 1:
                repeat_batch(cache, b)
            reset_peak_rss()
            times = decode(model, cache, b, context, new_tokens, vocab, name)
            rows.append(_row(model, name, context, b, new_tokens, prefill_s, times, cache, roofs, cache_dtype))
            del cache
    return rows


def prefilled_cache(model, ids: torch.Tensor, capacity: int, cache_dtype, kind: str) -> tuple:
    """ids (1, T) prefilled (PREFILL_CHUNK tokens per forward) into the model's own cache (`new_cache`) or
    transformers' StaticCache ("static") -> (cache, seconds)."""
    cache = (StaticCache(config=model.config, max_cache_len=capacity) if kind == "static"
             else new_cache(model, capacity, cache_dtype))
    start = time.perf_counter()
    prefill(model, ids, cache, chunk=PREFILL_CHUNK)
    return cache, time.perf_counter() - start


def repeat_batch(cache, b: int) -> None:
    """Every sequence of a prefilled cache repeated b times (transformers' StaticLayer has no
    batch_repeat_interleave: its fixed buffers are repeated directly). repeat_interleave returns views of
    a (B, b, ...) tensor, which a compiled step cannot take as inputs: a source cache's tensors are copied
    into their own (a LatentCache does so itself, keeping its views of one buffer)."""
    if isinstance(cache, StaticCache):
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.repeat_interleave(b, 0), layer.values.repeat_interleave(b, 0)
            layer.batch_size = layer.keys.shape[0]
    else:
        cache.batch_repeat_interleave(b)
    if not isinstance(cache, LatentCache):
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()


def floors(step_bytes: int, step_flops: int, step_s: float, roofs: tuple[float, float]) -> dict:
    """floor_s: the bytes a step reads at the bandwidth (the bandwidth floor); compute_floor_s: its FLOPs at
    the matmul rate; floor_fraction and roofline_fraction: that floor, and the larger of the two, over the
    step time. roofs: (bandwidth bytes/s, matmul FLOP/s)."""
    floor, compute = step_bytes / roofs[0], step_flops / roofs[1]
    return {"floor_s": floor, "floor_fraction": floor / step_s, "compute_floor_s": compute,
            "roofline_fraction": max(floor, compute) / step_s}


def _row(model, name, context, batch, new_tokens, prefill_s, times, cache, roofs, cache_dtype="model") -> dict:
    """One decode row, with its `floors` at the measured roofs."""
    step = statistics.median(times)
    per_token = cache_bytes_per_token(model, cache_dtype)
    held = cache_tensor_bytes(cache)
    step_bytes = step_weight_bytes(model, base_variant(name)) + per_token * batch * context
    flop = step_flops(model, base_variant(name), batch, context)
    return {"variant": name, "context": context, "batch": batch, "new_tokens": new_tokens,
            "cache_dtype": as_format(cache_dtype).name,
            "prefill_s": round(prefill_s, 4), "prefill_batch": 1, "decode_step_s": step,
            "decode_tokens_per_s": batch / step, "cache_bytes": held,
            "cache_bytes_formula": per_token * batch * (context + new_tokens), "cache_bytes_per_token": per_token,
            "peak_rss_bytes": peak_rss(), "step_bytes": step_bytes, "step_flops": flop,
            **floors(step_bytes, flop, step, roofs)}


def bench(model, against=None, contexts=(1024, 4096, 8192, 16384), batches=(1, 4, 16), new_tokens: int = 64,
          progress: bool = True, cache_dtype: str | CacheFormat = "model", compile: bool = False,
          roofs: tuple[float, float] | None = None) -> dict:
    """-> {"bandwidth_bytes_per_s", "threads", "rows": [...]}, rows as in `measure` (or `skipped`).
    roofs: (bandwidth bytes/s, matmul FLOP/s) measured earlier, so that several calls of one benchmark share
    one measurement (two measurements minutes apart have differed by 1.8x on this shared CPU)."""
    if not contexts or not batches or min(contexts) < 1 or min(batches) < 1 or new_tokens < 1:
        raise LatentKVError("bench needs positive --context, --batch and --new-tokens values, e.g. --context 1024,4096 "
                            "--batch 1,4 --new-tokens 64")
    groups = {}
    for name, m in variants(model, against, compile):
        groups.setdefault(id(m), (m, []))[1].append(name)
    todo = [(m, names, c) for m, names in groups.values() for c in contexts]
    roofs = roofs or (measure_bandwidth(), measure_flops())
    rows = []
    for m, names, context in tqdm(todo, desc="bench", disable=not progress):
        rows += measure(m, names, context, batches, new_tokens, roofs, cache_dtype=cache_dtype)
    if all("skipped" in r for r in rows):
        raise LatentKVError(f"no row of the grid fits this machine ({rows[0]['skipped']}); lower --context or --batch")
    return {"bandwidth_bytes_per_s": roofs[0], "flops_per_s": roofs[1], "threads": torch.get_num_threads(),
            "model": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "rows": rows}


def plot(result: dict, path: Path) -> None:
    """Decode tokens/s and cache GiB vs context, one line per variant and batch."""
    title = plot_title(result.get("model", "model"), result.get("dtype", "float32"))
    with figure(path, ncols=2, figsize=(11, 4.4), title=title) as (_, (speed, mem)):
        done = [r for r in result["rows"] if "skipped" not in r]
        key_of = lambda r: (r["variant"], r.get("budget"), r["batch"])  # noqa: E731 - budget: several conversions
        keys = list(dict.fromkeys(key_of(r) for r in done))
        lines = list(dict.fromkeys(k[:2] for k in keys))  # one color per model variant, one style per batch
        batches = sorted({k[2] for k in keys})
        for key in keys:
            pts = sorted((r["context"], r["decode_tokens_per_s"], r["cache_bytes"] / 2 ** 30) for r in done
                         if key_of(r) == key)
            own = key[0].startswith("source") or key[1] is None
            label = f"{key[0]}" + ("" if own else f" @{key[1]:g}") + f" b={key[2]}"
            style = dict(color=f"C{lines.index(key[:2]) % 10}", ls=("-", "--", ":", "-.")[batches.index(key[2]) % 4],
                         marker="os^D"[batches.index(key[2]) % 4])
            speed.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
            mem.plot([p[0] for p in pts], [p[2] for p in pts], label=label, **style)
        speed.set(xlabel="context (tokens)", ylabel="decode tokens/s", xscale="log", yscale="log", title="decode speed")
        mem.set(xlabel="context (tokens)", ylabel="KV cache GiB held", xscale="log", yscale="log", title="cache memory")
        contexts = [r["context"] for r in done]
        for ax in (speed, mem):
            ax.grid(alpha=0.3)
            readable_log_axes(ax, xticks=contexts)
        speed.legend(fontsize=6, ncol=2)


def write_bench(result: dict, out, overwrite: bool = False) -> Path:
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "bench.json").write_text(json.dumps(result, indent=2))
        plot(result, tmp / "bench.png")
    return Path(out)
