"""QK-norm designs side by side on a real QK-norm model -> BENCHMARKS.md ("qk-norm").

    python benchmarks/qk_norm.py --model gemma3-270m --windows 2

The key of a QK-norm model is w * (W_k x) / rms(W_k x): linear in x but for one scalar per token and KV
head. Rows, each with the query norm kept exact (a query needs no cache):
  per-token scale   latentkv: the scale is computed from the exact source key when the token is written
                    and cached beside c_kv (one value per KV head, counted in the budget)
  mean scale        the scale replaced by its calibration mean per layer and KV head, folded into the
                    weights: no extra cache value; what a DeepSeek-V3 export would have to do for keys
  no key norm       the scale dropped (norm weight folded, rms ignored): what converters that treat the
                    key as linear do
each at the full budget (`ExactConfig`: the design's cost alone) and at --budget (`SVDConfig`).
The means come from WikiText-2 *valid* windows; perplexity is measured on WikiText-2 and PTB test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from latentkv import ExactConfig, SVDConfig, convert, load_model, load_text
from latentkv.evaluation.perplexity import perplexity
from latentkv.runtime.install import mla_layers

from common import add_output_args, section, write_section

TEXTS = ("wikitext2", "ptb")


def mean_scales(model, tok, windows: int, seq_len: int) -> tuple[list[torch.Tensor], float]:
    """Per MLA layer the mean key scale (S,) over calibration tokens (WikiText-2 valid), and the scales'
    spread over tokens (std / mean, averaged over layers and KV heads): what a constant cannot follow."""
    ids = tok(load_text("wikitext2-valid")[:400_000], return_tensors="pt").input_ids[0]
    attns = mla_layers(model)
    seen: list[list[torch.Tensor]] = [[] for _ in attns]
    for attn, got in zip(attns, seen):
        attn._latent = _recorder(attn._latent, got)
    with torch.no_grad():
        for w in range(windows):
            model(ids[w * seq_len:(w + 1) * seq_len][None])
    for attn in attns:
        del attn._latent  # back to the class's method
    scales = [torch.cat([s.reshape(-1, s.shape[-1]) for s in got]).double() for got in seen]  # (tokens, S)
    spread = torch.stack([(s.std(0) / s.mean(0)).mean() for s in scales]).mean()
    return [s.mean(0) for s in scales], float(spread)


def _recorder(latent, got: list):
    def run(x):
        out = latent(x)
        got.append(out[2])
        return out
    return run


def fix_scales(model, values: list[torch.Tensor] | None) -> None:
    """Replace every layer's per-token key scale by a constant (S,) (None: 1, the norm dropped), on
    this model instance only."""
    for attn, value in zip(mla_layers(model), values or [None] * len(mla_layers(model))):
        attn._latent = _constant(attn, attn._latent, value)


def _constant(attn, latent, value):
    pair = attn.key_scale_of_pair.repeat(2)

    def run(x):
        c_kv, k_pe, s = latent(x)  # k_pe already carries s per rope pair
        const = torch.ones_like(s) if value is None else value.to(s.dtype).expand_as(s)
        return c_kv, k_pe / s[..., pair] * const[..., pair], const
    return run


def measure(model, tok, args) -> dict:
    return {t: perplexity(model, tok, load_text(t), seq_len=args.seq_len, max_windows=args.windows,
                          progress=False).ppl for t in TEXTS}


def run(args) -> dict:
    source, tok = load_model(args.model, progress=False)
    source.config._attn_implementation = "eager"
    res = {"source": measure(source, tok, args)}
    for name, config in (("full", ExactConfig()), (f"{args.budget:.0%}", SVDConfig(kv_budget=args.budget))):
        conv = convert(source, config, progress=False)
        res[f"{name} per-token scale"] = measure(conv, tok, args)
        means, spread = mean_scales(conv, tok, args.calib_windows, args.seq_len)
        fix_scales(conv, means)
        res[f"{name} mean scale"] = measure(conv, tok, args)
        conv = convert(source, config, progress=False)
        fix_scales(conv, None)
        res[f"{name} no key norm"] = measure(conv, tok, args)
        res[f"{name} scale spread"] = {"std_over_mean": spread}
        print(name, json.dumps({k: v for k, v in res.items() if k.startswith(name)}), file=sys.stderr, flush=True)
    return res


def markdown(args, res: dict) -> str:
    src = res["source"]
    spread = res.get("full scale spread", {}).get("std_over_mean")
    intro = (f"Perplexity on the first {args.windows} windows of {args.seq_len} tokens of each test text, eager "
             f"kernel; ratio = ppl / source ppl. Mean scales from {args.calib_windows} WikiText-2 valid windows; "
             f"the per-token key scales vary by std/mean = {spread:.3f} around them (mean over layers).")
    lines = ["| budget | key design | extra cache values / token / layer | wikitext2 | ptb |", "|---|---|---:|---:|---:|",
             "| - | source | - | " + " | ".join(f"{src[t]:.3f}" for t in TEXTS) + " |"]
    for k, r in res.items():
        if k == "source" or "spread" in k:
            continue
        budget, design = k.split(" ", 1)
        extra = "S (1 per KV head)" if design == "per-token scale" else "0"
        lines.append(f"| {budget} | {design} | {extra} | "
                     + " | ".join(f"{r[t]:.3f} (x{r[t] / src[t]:.3f})" for t in TEXTS) + " |")
    return section(args.section, f"QK-norm designs: {args.model}", intro, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--windows", type=int, default=2, help="test windows per text")
    p.add_argument("--calib-windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    add_output_args(p, "qk-norm", json_out="runs/qk_norm.json")
    args = p.parse_args()
    res = run(args)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(res, indent=2))
    write_section(Path(args.md), args.section, markdown(args, res))


if __name__ == "__main__":
    main()
