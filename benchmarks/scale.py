"""Streaming conversion at 7B/8B scale without internet: random weights with the exact shapes -> BENCHMARKS.md.

    python benchmarks/scale.py --shape llama3-8b --out /tmp/scale
    python benchmarks/scale.py --shape llama2-7b --out /tmp/scale
    python benchmarks/scale.py --shape llama3-8b --layers 2 --preset flashmla --verify --out /tmp/scale

Writes a random-weight bf16 checkpoint with the exact shapes of the named model (config.json,
~2 GB safetensors shards, index, and a 32k-entry BPE tokenizer trained on the calibration text),
then runs `latentkv convert --stream` on it under `/usr/bin/time -v` (peak RSS of the converting
process alone) and reports wall time, peak RSS and the per-layer split of time into reading,
calibration passes, factorizing and writing. Random weights say nothing about quality; they say
what memory and time a real checkpoint of that shape costs. `--layers N` truncates the depth
(a quick look at the per-layer cost); `--device cuda` runs the calibration passes on a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import add_output_args, section, write_section

SHAPES = {
    # Llama-2-7B: MHA (32 KV heads), no RoPE scaling
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_theta=10000.0),
    # Llama-3(.1)-8B: GQA (8 KV heads), llama3 RoPE scaling, 128k vocabulary
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192}),
    # a few-MB stand-in with the same structure, for trying the script
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5),
}
SHARD_BYTES = 2 * 2**30


def make_checkpoint(shape: str, path: Path, layers: int | None, calib_text: str) -> dict:
    """Random bf16 weights, N(0, 0.02) (norms 1), written shard by shard: memory stays ~one shard."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = dict(SHAPES[shape], num_hidden_layers=layers or SHAPES[shape]["num_hidden_layers"])
    config = LlamaConfig(**cfg, tie_word_embeddings=False, dtype="bfloat16")
    path.mkdir(parents=True)
    config.save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    shard, shards, weight_map, total = {}, [], {}, 0

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({k: name for k in shard})
        shard.clear()

    for name, shape_ in tensor_shapes(config):
        t = torch.ones(shape_) if "norm" in name else torch.randn(shape_, generator=gen) * 0.02
        shard[name] = t.to(torch.bfloat16)
        total += shard[name].numel() * 2
        if sum(v.numel() * 2 for v in shard.values()) >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    train_tokenizer(calib_text, min(32000, config.vocab_size)).save_pretrained(path)
    return {"params": total // 2, "bytes": total, "shards": len(shards), "layers": config.num_hidden_layers}


def tensor_shapes(config):
    """(name, shape) of every tensor of a Llama checkpoint, in file order."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    yield "model.embed_tokens.weight", (v, d)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        yield from ((p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (d, d)),
                    (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                    (p + "self_attn.o_proj.weight", (d, d)), (p + "post_attention_layernorm.weight", (d,)),
                    (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                    (p + "mlp.down_proj.weight", (d, f)))
    yield "model.norm.weight", (d,)
    yield "lm_head.weight", (v, d)


def train_tokenizer(text: str, vocab: int):
    """A byte-level BPE with `vocab` entries trained on the calibration text (ids fit any vocab >= it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def convert(src: Path, out: Path, args) -> dict:
    """`latentkv convert --stream` in its own process under /usr/bin/time -v -> its numbers."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "latentkv", "convert", str(src), "--stream",
           "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
           "--device", args.device, "--out", str(out), "--json"]
    for flag, value in (("--kv-budget", args.budget), ("--rope", args.rope), ("--preset", args.preset)):
        if value is not None:
            cmd += [flag, str(value)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"conversion failed:\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    record = json.loads((out / "latentkv.json").read_text())["record"]
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(rss_kib / 2**20, 2), "result": result,
            "layers": record["streaming"]["layers"], "out_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}


def weight_bytes(folder: Path) -> dict:
    """Bytes of layer 0's attention, of layer 0 whole, and of everything outside the layers, from the
    safetensors headers of `folder` (nothing is loaded: `shard_tensors` gives meta tensors)."""
    from latentkv.io.shards import shard_tensors

    out = {"attention": 0, "layer": 0, "rest": 0}
    for file in folder.glob("*.safetensors"):
        for name, t in shard_tensors(file).items():
            nbytes = t.numel() * t.element_size()
            if ".layers.0." in name:
                out["layer"] += nbytes
                out["attention"] += nbytes if ".self_attn." in name else 0
            elif ".layers." not in name:
                out["rest"] += nbytes
    return out


def weights_table(args, folders: dict[str, Path]) -> list[str]:
    """Held weight bytes per layer and at the shape's full depth (the layers are alike, so a truncated
    run scales exactly): the source, our converted checkpoint, and the DeepSeek-V3 export when made."""
    depth, gib = SHAPES[args.shape]["num_hidden_layers"], 2**30
    sizes = {name: weight_bytes(folder) for name, folder in folders.items() if folder.is_dir()}
    src = sizes["source"]
    reads = {"source": src["attention"], "latentkv (ours)": decode_reads(folders["latentkv (ours)"])}
    lines = ["", f"Weights held (bf16; per layer from layer 0, the whole model at the shape's {depth} layers) and the "
             "attention weights one absorbed decode step reads per layer (`MLAAttention.decode_weight_bytes`; the "
             "source reads its q/k/v/o):", "",
             "| checkpoint | attention / layer | read per decode step / layer | layer | whole model | vs source |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, w in sizes.items():
        whole = w["rest"] + depth * w["layer"]
        read = f"{reads[name] / 2**20:.1f} MiB ({reads[name] / src['attention']:.3f}x)" if name in reads else "-"
        lines.append(f"| {name} | {w['attention'] / 2**20:.1f} MiB | {read} | {w['layer'] / 2**20:.1f} MiB | "
                     f"{whole / gib:.2f} GiB | {whole / (src['rest'] + depth * src['layer']):.3f}x |")
    return lines


def decode_reads(folder: Path) -> int:
    """Attention weight bytes one absorbed decode step of layer 0 reads, the model loaded as stored (bf16)."""
    from latentkv import load_model

    model, _ = load_model(folder, dtype="auto", progress=False)
    return model.model.layers[0].self_attn.decode_weight_bytes()


def export_and_verify(out: Path, ds: Path) -> dict:
    """`latentkv export` then `latentkv verify-export` (stock transformers vs our runtime) -> their numbers."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "latentkv", "export", str(out), "--out", str(ds), "-q"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"export failed:\n{done.stderr[-3000:]}")
    export_s = time.perf_counter() - t0
    done = subprocess.run([sys.executable, "-m", "latentkv", "verify-export", str(ds), "--against", str(out),
                           "--tokens", "32", "--json", "-q"], capture_output=True, text=True)
    if not done.stdout.strip():
        sys.exit(f"verify-export failed:\n{done.stderr[-3000:]}")
    config = json.loads((ds / "config.json").read_text())
    return {"export_s": round(export_s, 1), **json.loads(done.stdout.strip().splitlines()[-1]),
            "engine_dims": f"{config['kv_lora_rank']}+{config['qk_rope_head_dim']}"}


def markdown(args, made: dict, conv: dict, verified: dict | None = None, weights: list[str] | None = None) -> str:
    r, layers = conv["result"], conv["layers"]
    med = {k: statistics.median(layer[k] for layer in layers) for k in ("read_s", "calibrate_s", "factorize_s",
                                                                        "write_s")}
    tot = {k: sum(layer[k] for layer in layers) for k in med}
    gib = 2**30
    title = f"Streaming conversion of a {args.shape}-shaped checkpoint ({made['layers']} layers, random bf16 weights)"
    rope = args.rope or ("rorope-export (the preset's --target deepseek_v3)" if args.preset else "rorope (default)")
    intro = (f"Device {args.device}. RoPE strategy: {rope}. "
             f"Calibration: {args.calib_samples} windows x "
             f"{args.calib_seq_len} tokens. Peak RSS: "
             "`/usr/bin/time -v` of the converting process.")
    lines = ["| params | source (bf16) | output | budget | rope + latent | cache values/token/layer | wall s | "
             "peak RSS GiB |", "|---:|---:|---:|---:|---|---:|---:|---:|",
             f"| {made['params'] / 1e9:.2f} B | {made['bytes'] / gib:.2f} GiB ({made['shards']} shards) | "
             f"{conv['out_bytes'] / gib:.2f} GiB | {args.preset or args.budget} | {r['qk_rope_head_dim']} + "
             f"{r['kv_lora_rank']} | "
             f"{r['cache_values_per_token_per_layer']} of {r['source_values_per_token_per_layer']} | "
             f"{conv['wall_s']} | **{conv['peak_rss_gib']}** |", "",
             "Per layer (seconds):", "", "| | read | calibration passes | factorize | write |", "|---|---:|---:|---:|---:|",
             "| median | " + " | ".join(f"{med[k]:.2f}" for k in med) + " |",
             "| total | " + " | ".join(f"{tot[k]:.1f}" for k in tot) + " |"]
    if verified:
        lines += ["", "Export and `verify-export` (stock transformers `DeepseekV3ForCausalLM` vs our runtime, 32 tokens):",
                  "", "| engine config kv_lora_rank+qk_rope_head_dim | export s | max abs logit diff | greedy agreement | "
                  "generation identical | cache bytes/token (stock, ours) | passed |", "|---|---:|---:|---:|---|---|---|",
                  f"| {verified['engine_dims']} | {verified['export_s']} | {verified['max_abs_diff']:.2e} | "
                  f"{verified['greedy_agreement']:.0%} | {verified['generation_match']} | "
                  f"{verified['cache_bytes_per_token']:,}, {verified['expected_cache_bytes_per_token']:,} | "
                  f"**{verified['passed']}** |"]
    return section(args.section, title, intro, lines + (weights or []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), required=True)
    p.add_argument("--out", required=True, help="work directory (needs ~2x the checkpoint size free)")
    p.add_argument("--budget", type=float, help="--kv-budget (default 0.25 without --preset; with it, the cap)")
    p.add_argument("--preset", help="latentkv convert --preset (flashmla: 512+64, flashinfer: 256+64)")
    p.add_argument("--verify", action="store_true", help="also export and run verify-export (needs fp32 RAM for "
                   "two copies: use --layers on big shapes)")
    p.add_argument("--layers", type=int, help="truncate the depth (quick per-layer look)")
    p.add_argument("--calib-samples", type=int, default=12, help="calibration windows (4 are held out)")
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rope", help="latentkv convert --rope (default: convert's own)")
    p.add_argument("--keep", action="store_true", help="keep the generated source and the output")
    add_output_args(p, None)  # --section default: scale-SHAPE
    args = p.parse_args()
    if args.budget is None and not args.preset:
        args.budget = 0.25
    args.section = args.section or (f"scale-{args.shape}" + (f"-{args.layers}l" if args.layers else "")
                                    + (f"-{args.preset}" if args.preset else ""))
    work = Path(args.out)
    src, out, ds = work / f"{args.shape}-source", work / f"{args.shape}-mla", work / f"{args.shape}-deepseek"
    for d in (src, out, ds):
        shutil.rmtree(d, ignore_errors=True)
    from latentkv.io.text import load_text

    t0 = time.perf_counter()
    made = make_checkpoint(args.shape, src, args.layers, load_text("wikitext2-valid"))
    print(f"wrote {made['bytes'] / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    conv = convert(src, out, args)
    verified = export_and_verify(out, ds) if args.verify else None
    weights = weights_table(args, {"source": src, "latentkv (ours)": out, "DeepSeek-V3 export": ds})
    body = markdown(args, made, conv, verified, weights)
    print(body)
    write_section(Path(args.md), args.section, body)
    if not args.keep:
        for d in (src, out, ds):
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
