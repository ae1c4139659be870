"""Quality per cache byte: rank budget x latent cache dtype, against the source's own K/V quantized ->
BENCHMARKS.md ("cache-quant") and docs/cache_quant.png.

    python benchmarks/cache_quant.py --budgets 1 0.5 0.25 --windows 4 --resume
    python benchmarks/cache_quant.py --budgets 0.46 0.22 --formats int8 int4+rope "int4 g32+rope" --resume

Rows:
  source K/V, DTYPE   the source with its own post-RoPE keys and values stored as DTYPE (one fp16 scale per
                      KV head and token, or per 32 values for "g32"; our implementation,
                      `runtime.cache.QuantizedKVCache`), same protocol
  source quanto intN  transformers' `QuantizedCache` (quanto backend, group 64, the last 128 tokens kept
                      in bf16), as transformers serves it: the window goes in 128-token chunks, each reading
                      the quantized past; only when `optimum-quanto` is installed (pip install --no-deps
                      optimum-quanto ninja)
  B, DTYPE            the default conversion at budget B (1 = the exact one) with its latents stored as DTYPE
                      (`LatentCache(cache_dtype=...)`; "+rope": the rope key too, else it stays bf16;
                      "int4a": int4_asym, 16 levels over each group's [min, max] with a zero point)
Bytes per token are counted as served: the unquantized parts in bf16, relative to the source's bf16 K/V.
Perplexity: WikiText-2 test, first --windows windows, with the cache protocol of `evaluation.perplexity`
(every query reads the stored latents). `--reuse B=DIR` takes a saved conversion instead of converting.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

from latentkv import ExactConfig, LatentCache, LowRankConfig, convert, load_model, load_text
from latentkv.evaluation.perplexity import perplexity
from latentkv.families import source_layout
from latentkv.io.plots import figure, plot_title, readable_log_axes
from latentkv.runtime.cache import QuantizedKVCache, token_bytes
from latentkv.runtime.install import mla_layers
from latentkv.runtime.quant import CacheFormat

from common import add_output_args, section, write_outputs

FORMATS = {"bf16": CacheFormat(), "fp8": CacheFormat("fp8_e4m3"), "fp8+rope": CacheFormat("fp8_e4m3", rope=True),
           "int8": CacheFormat("int8"), "int4": CacheFormat("int4"), "int4+rope": CacheFormat("int4", rope=True),
           "int4 g32+rope": CacheFormat("int4", group=32, rope=True), "int4a+rope": CacheFormat("int4_asym", rope=True),
           "int4a g32+rope": CacheFormat("int4_asym", group=32, rope=True)}
SOURCE_FORMATS = {"bf16": None, "fp8": CacheFormat("fp8_e4m3"), "int8": CacheFormat("int8"),
                  "int4": CacheFormat("int4"), "int4a": CacheFormat("int4_asym"), "int4 g32": CacheFormat("int4", group=32)}


def share(model, fmt: CacheFormat, source_bytes: int) -> float:
    """Cache bytes per token (unquantized parts at bf16) over the source's bf16 K/V bytes."""
    return sum(token_bytes(a.dims, fmt, 2) for a in mla_layers(model)) / source_bytes


def ppl(model, tok, text: str, args, factory=None) -> float:
    return perplexity(model, tok, text, seq_len=args.seq_len, max_windows=args.windows, progress=False,
                      cache_factory=factory).ppl


SHARE_TICKS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)  # the shares issue 19's targets and a user's budgets name
RATIO_TICKS = (1, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100)
QUANTO = {"source quanto int4": 4, "source quanto int2": 2}
QUANTO_GROUP, QUANTO_RESIDUAL = 64, 128


def quanto_share(bits: int, head_dim: int) -> float:
    """Bytes of one quanto-quantized head vector (codes, fp16 scale and zero point per group of 64) over
    bf16; the bf16 residual of 128 tokens is left out (it vanishes at long context)."""
    groups = -(-head_dim // QUANTO_GROUP)
    return (head_dim * bits / 8 + 4 * groups) / (2 * head_dim)


@torch.no_grad()
def chunked_ppl(model, tok, text: str, args, bits: int) -> float:
    """Perplexity with transformers' QuantizedCache as it serves: each window in QUANTO_RESIDUAL-token chunks."""
    from transformers import QuantizedCache

    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    total, count = 0.0, 0
    for w in range(args.windows):
        x = ids[w * args.seq_len:(w + 1) * args.seq_len][None]
        cache = QuantizedCache(backend="quanto", config=model.config, nbits=bits, q_group_size=QUANTO_GROUP,
                               residual_length=QUANTO_RESIDUAL)
        logits = torch.cat([model(x[:, i:i + QUANTO_RESIDUAL], cache=cache, use_cache=True).logits
                            for i in range(0, x.shape[1], QUANTO_RESIDUAL)], 1)
        total += torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
    return math.exp(total / count)


def run(args) -> dict:
    path = Path(args.json_out)
    res = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    source, tok = load_model(args.model, progress=False)
    text = load_text("wikitext2")
    layout = source_layout(source.config)
    src_bytes = 2 * layout.kv_values_per_token * layout.num_layers  # bf16

    def row(name, fn):
        if name not in res:
            res[name] = fn()
            print(name, json.dumps(res[name]), file=sys.stderr, flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=2))

    for name, fmt in SOURCE_FORMATS.items():
        factory = None if fmt is None else (lambda f=fmt: QuantizedKVCache(source, f))
        kv_bytes = src_bytes if fmt is None else QuantizedKVCache(source, fmt).bytes_per_token()
        row(f"source K/V {name}", lambda: {"share": kv_bytes / src_bytes, "ppl": ppl(source, tok, text, args, factory)})
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        for name, bits in QUANTO.items():
            row(name, lambda: {"share": quanto_share(bits, layout.head_dim), "protocol": "128-token chunks",
                               "ppl": chunked_ppl(source, tok, text, args, bits)})
    reuse = dict(item.split("=", 1) for item in args.reuse)
    for budget in args.budgets:
        names = [f"{budget:g} {n}" for n in args.formats]
        if all(n in res for n in names):
            continue
        model = converted(source, tok, budget, reuse.get(f"{budget:g}"))
        for name in args.formats:
            fmt = FORMATS[name]
            factory = None if not fmt.quantized else (lambda f=fmt: LatentCache(model, cache_dtype=f))
            row(f"{budget:g} {name}", lambda: {"share": share(model, fmt, src_bytes),
                                               "ppl": ppl(model, tok, text, args, factory)})
    return res


def converted(source, tok, budget: float, saved: str | None):
    if saved:
        return load_model(saved, progress=False)[0]
    config = ExactConfig() if budget >= 1 else LowRankConfig(kv_budget=budget)
    return convert(source, config, tokenizer=tok, progress=False)


def markdown(args, res: dict) -> str:
    src = res["source K/V bf16"]["ppl"]
    intro = (f"WikiText-2 test, first {args.windows} windows of {args.seq_len} tokens, every query reading the "
             "stored cache; share = cache bytes per token over the source's bf16 K/V (unquantized parts counted "
             "as bf16); ratio = ppl / source ppl. `source K/V` rows: the source's own keys and values quantized "
             "(ours, one fp16 scale per KV head and token, or per 32 values: g32); the others: the default "
             "conversion at that budget (1 = exact) with its latent stored as the dtype (+rope: the rope key too; "
             "int4a: asymmetric int4, an fp16 scale and zero point per token or group of 32). `source quanto` rows: "
             "transformers' QuantizedCache (quanto, group 64, last 128 tokens in bf16) fed 128-token chunks, as it "
             "serves (a kinder protocol: each chunk's own tokens and the residual stay bf16).")
    lines = ["| cache | share of bf16 K/V | ppl | ratio |", "|---|---:|---:|---:|"]
    for name, r in sorted(res.items(), key=lambda kv: (-kv[1]["share"], kv[1]["ppl"])):
        lines.append(f"| {name} | {r['share']:.1%} | {r['ppl']:.2f} | x{r['ppl'] / src:.2f} |")
    best = {t: min((r["ppl"] / src, n) for n, r in res.items() if r["share"] <= t + 1e-9) for t in (0.125, 0.0625)
            if any(r["share"] <= t + 1e-9 for r in res.values())}
    found = "; ".join(f"{t:.2%}: {n} (x{v:.2f})" for t, (v, n) in best.items()) or "no row is at or under 12.50%"
    lines += ["", "Best at or under a share: " + found,
              "", f"Plot: `{args.plot}`."]
    title = f"Quality per cache byte: {args.model}" + (f", {args.title}" if args.title else "")
    return section(args.section, title, intro, lines)


def plot(res: dict, path: Path) -> None:
    src = res["source K/V bf16"]["ppl"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with figure(path, figsize=(7, 4.4), title=plot_title(res.get("_model", "smollm2-135m"), "bytes counted as bf16")) as (plt, ax):
        groups: dict[str, list] = {}
        for name, r in res.items():
            if name.startswith("_"):
                continue
            key = ("source K/V, quanto (served in chunks)" if name.startswith("source quanto") else
                   "source K/V, ours" if name.startswith("source") else f"latent, budget {name.split()[0]}")
            groups.setdefault(key, []).append((r["share"], r["ppl"] / src, name.split(" ", 2)[-1]))
        for i, (key, pts) in enumerate(sorted(groups.items())):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--" if key.startswith("source") else "o-", color=f"C{i}",
                    label=key)
        ax.set_xscale("log")
        ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter

        shares = [p[0] for pts in groups.values() for p in pts]
        ratios = [p[1] for pts in groups.values() for p in pts]
        readable_log_axes(ax, xticks=[s for s in SHARE_TICKS if min(shares) / 1.5 <= s <= max(shares) * 1.5],
                          yticks=[y for y in RATIO_TICKS if y <= max(ratios) * 1.2])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"x{v:g}"))
        ax.set_xlabel("cache bytes per token / source bf16 K/V")
        ax.set_ylabel("WikiText-2 ppl / source ppl")
        ax.legend(fontsize=8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS), help="latent cache rows")
    p.add_argument("--reuse", nargs="*", default=[], help="BUDGET=DIR: a saved default conversion at that budget")
    p.add_argument("--plot", default="docs/cache_quant.png")
    p.add_argument("--title", help="what sets this section apart, appended to its title")
    add_output_args(p, "cache-quant", json_out="runs/cache_quant.json", resume="skip rows already in --json-out")
    args = p.parse_args()
    res = run(args)
    write_outputs(args, res, markdown(args, res))
    plot({**res, "_model": args.model}, Path(args.plot))


if __name__ == "__main__":
    main()
