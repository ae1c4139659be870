"""How much of a layer's rotational score energy a rope key of p dims can keep, per model and budget
share, weights only -> BENCHMARKS.md ("rope-energy").

    python benchmarks/rope_energy.py --models smollm2-135m gemma3-270m --shares 0.125 0.25 0.5

Energy of a channel = its score contribution (E|k|^2 * sum over heads E|q|^2, MHA2MLA's 2-norm, with
identity input statistics) times the share of it lost when the channel stops rotating (1 - |mean
rotation|^2 over --horizon tokens, `conversion.rope.drop_cost`), in RoRoPE's basis (per frequency,
PCA across KV heads). Kept = the top channels that fit p = share x (G x d) rope dims, summed over
layers with every layer weighted alike. With one KV head (MQA: Gemma-3) RoRoPE has nothing to mix
across heads, so every channel is one source pair and the top channels are simply the top pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from latentkv import load_model
from latentkv.conversion.rope import RoRoPE
from latentkv.families import attention_layers, read_attention, source_layout

from common import add_output_args, section, write_section


def kept_energy(model, shares, horizon: int) -> dict:
    """-> {share: mean over layers of the energy share kept}, plus the per-layer-type split."""
    layout = source_layout(model.config)
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * layout.num_layers
    out: dict = {"layers": layout.num_layers, "kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim}
    per_layer = []
    for i, attn in enumerate(attention_layers(model)):
        lay = layout.for_layer(i)
        src = read_attention(attn).at_least_float32()
        e = RoRoPE().energy(src, lay, None, horizon).flatten().double()
        e = e / e.sum().clamp(min=1e-30)
        per_layer.append(e.sort(descending=True).values)
    for share in shares:
        pairs = max(1, round(share * layout.num_kv_heads * layout.head_dim / 2))
        kept = torch.stack([e[:pairs].sum() for e in per_layer])
        out[str(share)] = {"pairs": pairs, "kept": float(kept.mean()),
                           **{t: float(kept[[j for j, k in enumerate(types) if k == t]].mean()) for t in set(types)}}
    return out


def markdown(args, res: dict) -> str:
    intro = (f"Weights only, horizon {args.horizon} tokens; share = rope dims / (KV heads x head_dim); kept = mean "
             "over layers of the rotational score energy the top channels keep (by layer type where types differ).")
    lines = ["| model | KV heads x head_dim | rope share | pairs | kept (all layers) | by layer type |",
             "|---|---|---:|---:|---:|---|"]
    for name, r in res.items():
        for share in args.shares:
            c = r[str(share)]
            types = ", ".join(f"{k}: {v:.3f}" for k, v in c.items() if k not in ("pairs", "kept"))
            lines.append(f"| {name} | {r['kv_heads']} x {r['head_dim']} | {share:.3g} | {c['pairs']} | {c['kept']:.3f} "
                         f"| {types} |")
    return section(args.section, "Rope key: rotational energy kept per share of the key", intro, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--shares", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    p.add_argument("--horizon", type=int, default=512)
    add_output_args(p, "rope-energy", json_out="runs/rope_energy.json")
    args = p.parse_args()
    res = {m: kept_energy(load_model(m, progress=False)[0], args.shares, args.horizon) for m in args.models}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(res, indent=2))
    write_section(Path(args.md), args.section, markdown(args, res))


if __name__ == "__main__":
    main()
