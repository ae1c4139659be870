"""Why converted models stop copying: the copy probe with one layer converted at a time, and plans
that keep some layers exact at the same total cache budget -> BENCHMARKS.md ("copy-layers").

    python benchmarks/copy_layers.py --dims 120+72 --sweep --plans uniform 19,20@106 12,19,20,22,23@98+56

`--dims R+P` is the uniform split (kv_lora_rank R + qk_rope_head_dim P; 120+72 is what the split
search picks for SmolLM2 at 50 %). `--sweep` converts each layer alone at that split. A plan
`LAYERS@R[+P]` keeps LAYERS exact (every rotated dim and a full latent) and converts the others at
R (+P); pick R so that the total equals the uniform one (the table prints both). Probe: the suite's
copy probe at lengths 64/256, distances 0/256, 4 sequences each, seed 0. Perplexity: the first
window of 1024 tokens of the WikiText-2 and code evaluation parts. Calibration: the default mixture.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from tqdm.auto import tqdm

from latentkv import LowRankConfig, load_model
from latentkv.conversion.calibration import calibration_ids, oneshot_stats
from latentkv.conversion.surgery import convert_layer, convert_oneshot
from latentkv.evaluation.copy import copy_probe
from latentkv.evaluation.perplexity import perplexity
from latentkv.families import source_layout
from latentkv.io.domains import domain_text

from common import add_output_args, section, write_outputs

PROBE = {"lengths": (64, 256), "distances": (0, 256)}
TEXTS = ("wikitext2", "code")


def measure(model, tok) -> dict:
    probe = copy_probe(model, progress=False, **PROBE)
    out = {"copy": probe["accuracy"], "copy_nll": probe["nll"]}
    for name in TEXTS:
        out[name] = perplexity(model, tok, domain_text(name, "eval"), seq_len=1024, max_windows=1, progress=False).ppl
    return out


def plan_dims(spec: str, dims: tuple[int, int], full: int, layers: int) -> list[tuple[int, int]]:
    """'uniform' | 'L1,L2@R[+P]' -> per-layer (kv_lora_rank, qk_rope_head_dim)."""
    if spec == "uniform":
        return [dims] * layers
    kept, _, rest = spec.partition("@")
    r, _, p = rest.partition("+")
    exact = {int(i) for i in kept.split(",")}
    return [(full, full) if i in exact else (int(r), int(p) if p else dims[1]) for i in range(layers)]


@torch.no_grad()
def run(args) -> dict:
    source, tok = load_model(args.model)
    layout = source_layout(source.config)
    r, p = (int(x) for x in args.dims.split("+"))
    config = LowRankConfig(kv_lora_rank=r, qk_rope_head_dim=p)
    ids, _ = calibration_ids(tok, config)
    stats = oneshot_stats(source, ids)
    full = layout.num_kv_heads * layout.head_dim
    out = {"source": measure(source, tok), "plans": [], "sweep": []}
    for spec in tqdm(args.plans, desc="plans"):
        dims = plan_dims(spec, (r, p), full, layout.num_layers)
        row = {"plan": spec, "values": sum(a + b for a, b in dims), **measure(
            convert_oneshot(source, layout, config, dims, stats), tok)}
        out["plans"].append(row)
        print(json.dumps(row), flush=True)
    if args.sweep:
        work = copy.deepcopy(source)
        for i in tqdm(range(layout.num_layers), desc="one layer converted"):
            original = work.model.layers[i].self_attn
            convert_layer(source, work, i, layout, config, (r, p), stats[i])
            out["sweep"].append({"layer": i, "copy": copy_probe(work, progress=False, **PROBE)["accuracy"]})
            work.model.layers[i].self_attn = original
    return out


def markdown(args, res: dict) -> str:
    src = res["source"]
    intro = (f"Uniform split {args.dims}; plans keep the listed layers exact and convert the rest at the given "
             "rank (`values` = cache values per token summed over layers). Copy probe at lengths 64/256, "
             "distances 0/256; perplexity on one 1024-token window. Calibration: the default mixture.")
    lines = ["| plan | values | copy | copy NLL | WikiText-2 ppl | code ppl |", "|---|---:|---:|---:|---:|---:|",
             f"| source | - | {src['copy']:.1%} | {src['copy_nll']:.2f} | {src['wikitext2']:.2f} | {src['code']:.2f} |"]
    lines += [f"| {r['plan']} | {r['values']} | {r['copy']:.1%} | {r['copy_nll']:.2f} | {r['wikitext2']:.2f} "
              f"| {r['code']:.2f} |" for r in res["plans"]]
    if res["sweep"]:
        lines += ["", "Copy accuracy with only layer l converted (source: "
                  f"{src['copy']:.1%}):", "", "| layer | " + " | ".join(str(s["layer"]) for s in res["sweep"]) + " |",
                  "|---|" + "---:|" * len(res["sweep"]),
                  "| copy | " + " | ".join(f"{s['copy']:.0%}" for s in res["sweep"]) + " |"]
    return section(args.section, f"Which layers copying rests on: {args.model}", intro, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dims", default="120+72", help="uniform kv_lora_rank+qk_rope_head_dim")
    p.add_argument("--plans", nargs="*", default=["uniform"], help="uniform | LAYERS@R[+P]")
    p.add_argument("--sweep", action="store_true", help="also convert each layer alone")
    add_output_args(p, "copy-layers", json_out="runs/copy_layers.json")
    args = p.parse_args()
    res = run(args)
    write_outputs(args, res, markdown(args, res))


if __name__ == "__main__":
    main()
