"""`latentkv` command line: one subcommand per library verb; errors are one line, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _convert(a) -> dict:
    from .atomic import check_output_dir
    from .checkpoint import save
    from .conversion import convert, record_of
    from .loading import load_model
    from .methods import make_config
    from .report import record_summary

    config = make_config(a.kv_budget, a.kv_lora_rank, a.qk_rope_head_dim, a.method, a.kv_values, rope=a.rope,
                         factorizer=a.factorizer, sequential=True if a.sequential else None, calib=a.calib,
                         calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len,
                         rank_allocation=a.rank_allocation, attn_moment=a.attn_moment,
                         latent_norm=True if a.latent_norm else None, target=a.target, rope_horizon=a.rope_horizon)
    check_output_dir(a.out, a.overwrite)
    t0 = time.perf_counter()
    if a.stream:
        from .streaming import convert_streaming

        record = convert_streaming(a.source, config, a.out, overwrite=a.overwrite, device=a.device)
        return {"out": a.out, "method": config.method, **record_summary(record),
                "streaming": {k: v for k, v in record["streaming"].items() if k != "layers"},
                "total_seconds": round(time.perf_counter() - t0, 2)}
    from .streaming import check_fits_in_memory

    check_fits_in_memory(a.source)
    model, tok = load_model(a.source, trust_remote_code=a.trust_remote_code)
    converted = convert(model, config, tokenizer=tok)
    if a.target:
        from .export import exportable_dims, kernel_warning

        warning = kernel_warning(exportable_dims(converted))
        if warning:
            print(warning, file=sys.stderr)
    save(converted, tok, a.out, overwrite=a.overwrite)
    return {"out": a.out, "method": config.method, **record_summary(record_of(converted)),
            "total_seconds": round(time.perf_counter() - t0, 2)}


def _eval(a) -> dict:
    from .errors import LatentKVError
    from .loading import load_model

    if not a.ppl and not a.passkey:
        raise LatentKVError("eval needs --ppl FILE and/or --passkey")
    text = None
    if a.ppl:
        from .text import load_text

        text = load_text(a.ppl)
    model, tok = load_model(a.model, trust_remote_code=a.trust_remote_code)
    if tok is None:
        raise LatentKVError(f"{a.model} has no tokenizer files; re-run `latentkv convert` from a source with one")
    out = {"model": a.model}
    if text is not None:
        from .evaluate import perplexity

        result = perplexity(model, tok, text, seq_len=a.seq_len, stride=a.stride, max_windows=a.max_windows)
        out.update(text=a.ppl, **result.to_dict())
    if a.passkey:
        from .passkey import passkey

        out["passkey"] = passkey(model, tok, contexts=_numbers(a.context, int), depths=_numbers(a.depths, float),
                                 trials=a.trials)
    return out


def _numbers(csv: str, kind):
    from .errors import LatentKVError

    try:
        return tuple(kind(v) for v in csv.split(","))
    except ValueError:
        raise LatentKVError(f"expected comma-separated numbers, got {csv!r}") from None


def _info(a) -> dict:
    from .loading import load_model
    from .report import cache_report

    model, _ = load_model(a.model, trust_remote_code=a.trust_remote_code)
    return cache_report(model)


def _demo(a) -> dict:
    from .demo import run_demo

    return run_demo(kv_budget=a.kv_budget, out=a.out, overwrite=a.overwrite, seq_len=a.seq_len,
                    max_windows=a.max_windows, text=a.text)


def _sweep(a) -> dict:
    from .loading import load_model
    from .sweep import run_sweep, write_sweep

    from .atomic import check_output_dir

    check_output_dir(a.out, a.overwrite)
    model, tok = load_model(a.source, trust_remote_code=a.trust_remote_code)
    result = run_sweep(model, tok, _numbers(a.budgets, float), a.methods.split(","), a.ppl, seq_len=a.seq_len,
                       max_windows=a.max_windows, passkey_contexts=_numbers(a.passkey, int) if a.passkey else ())
    write_sweep(result, a.out, "latentkv " + " ".join(sys.argv[1:]), overwrite=a.overwrite)
    return {**result, "out": a.out}


def _generate(a) -> dict:
    from .errors import LatentKVError
    from .generation import generate
    from .loading import load_model

    prompts = [a.prompt] if a.prompt is not None else []
    if a.batch_file:
        from pathlib import Path

        path = Path(a.batch_file)
        if not path.is_file():
            raise LatentKVError(f"batch file {path} not found; give a text file with one prompt per line")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise LatentKVError(f"batch file {path} has no prompts; put one prompt per line")
    if not prompts:
        raise LatentKVError('give a prompt (latentkv generate MODEL "text") or --batch-file FILE')
    model, tok = load_model(a.model, trust_remote_code=a.trust_remote_code)
    if tok is None:
        raise LatentKVError(f"{a.model} has no tokenizer files; re-run `latentkv convert` from a source with one")
    live = not a.json and len(prompts) == 1
    stream = (lambda i, text: print(text, end="", flush=True)) if live else None
    out = generate(model, tok, prompts, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                   stop=tuple(a.stop or ()), seed=a.seed, stream=stream)
    if live:
        print()
    return {"prompts": prompts, **out.to_dict(), "streamed": live}


def _bench(a) -> dict:
    from .atomic import check_output_dir
    from .bench import bench, write_bench
    from .loading import load_model

    contexts, batches = _numbers(a.context, int), _numbers(a.batch, int)
    check_output_dir(a.out, a.overwrite)
    model, _ = load_model(a.model, trust_remote_code=a.trust_remote_code)
    against = load_model(a.against, trust_remote_code=a.trust_remote_code)[0] if a.against else None
    result = bench(model, against, contexts, batches, a.new_tokens)
    write_bench(result, a.out, overwrite=a.overwrite)
    return {**result, "out": a.out}


def _export(a) -> dict:
    from .export import export

    export(a.model, a.out, fmt=a.format, overwrite=a.overwrite, max_shard_size=a.max_shard_size)
    return {"out": a.out, "format": a.format}


def _verify_export(a) -> dict:
    from .verify import verify_export

    text = None
    if a.text:
        from .text import load_text

        text = load_text(a.text)
    result = verify_export(a.out, a.against, text=text, tokens=a.tokens, atol=a.atol)
    if not result["passed"]:
        a.exit_code = 1
    return result


def _load(a) -> dict:
    from .engine_import import require_engine_checkpoint
    from .loading import load_model
    from .report import cache_report

    require_engine_checkpoint(a.model)
    model, _ = load_model(a.model)
    if a.out:
        from .checkpoint import save

        save(model, _, a.out, overwrite=a.overwrite)
    rep = cache_report(model)
    return {**rep, "out": a.out}


def _print_human(cmd: str, result: dict) -> None:
    if cmd in ("heal", "doctor"):
        from .cli_more import print_doctor, print_heal

        return (print_heal if cmd == "heal" else print_doctor)(result)
    if cmd == "generate":
        if not result["streamed"]:
            for prompt, text in zip(result["prompts"], result["texts"]):
                print(f"{prompt}{text}")
        print(f"[{result['decode_tokens_per_s']:.1f} tokens/s decode, prefill {result['prefill_s']:.2f}s, "
              f"cache {result['cache_bytes']:,} bytes]", file=sys.stderr)
        return
    if cmd == "bench":
        print(f"memory bandwidth {result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
              f"{result['flops_per_s'] / 1e9:.0f} GFLOP/s, {result['threads']} threads")
        for r in result["rows"]:
            head = f"{r['variant']:>16} ctx {r['context']:>6} batch {r['batch']:>3}"
            if "skipped" in r:
                print(f"{head}  skipped: {r['skipped']}")
                continue
            print(f"{head}  prefill {r['prefill_s']:7.2f}s  decode {r['decode_tokens_per_s']:8.1f} tok/s  cache "
                  f"{r['cache_bytes'] / 2 ** 20:9.1f} MiB  peak RSS {r['peak_rss_bytes'] / 2 ** 30:5.2f} GiB  "
                  f"floor {r['floor_fraction']:.0%} (roofline {r['roofline_fraction']:.0%})")
        print(f"written to {result['out']} (bench.json, bench.png)")
        return
    if cmd == "sweep":
        from .sweep import markdown

        print(markdown(result, "latentkv " + " ".join(sys.argv[1:])))
        print(f"written to {result['out']} (sweep.json, sweep.md, ppl_vs_cache.png)")
        return
    if cmd == "demo":
        from .demo import print_demo

        return print_demo(result)
    if cmd == "verify-export":
        verdict = "PASSED" if result["passed"] else "FAILED"
        print(f"{verdict}: max |logit diff| {result['max_abs_diff']:.2e} (atol {result['atol']:g}) over "
              f"{result['tokens']} tokens, greedy agreement {result['greedy_agreement']:.1%}, greedy generation "
              f"{'identical' if result['generation_match'] else 'DIFFERS'}, stock cache "
              f"{result['cache_bytes_per_token']:,} bytes/token (latent: {result['expected_cache_bytes_per_token']:,})")
        return
    if cmd in ("info", "load"):
        src, mod = result["source"], result["model"]
        print(f"architecture: {result['architecture']}  dtype: {result['dtype']}  layers: {result['num_layers']}")
        vals = mod["values_per_token_per_layer"]
        per_layer = vals[0] if len(set(vals)) == 1 else vals
        print(f"cache values/token/layer: {per_layer} (source {src['values_per_token_per_layer']})")
        print(f"cache bytes/token: {mod['bytes_per_token']:,} (source {src['bytes_per_token']:,}), "
              f"{result['ratio']:.1%} of the source")
        if result["record"]:
            print("conversion:", json.dumps(result["record"]["conversion"]),
                  f"in {result['record']['convert_seconds']}s from {result['record']['source']['name_or_path']}")
        return
    for k, v in result.items():
        if k == "passkey":
            print(f"passkey accuracy: {v['accuracy']:.1%}")
            for row in v["rows"]:
                print(f"  context {row['context']:>6}  depth {row['depth']:.2f}  {row['correct']}/{row['trials']}")
            continue
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentkv", description="Convert GQA/MHA models to MLA with a small latent KV cache.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, fn, help_):
        s = sub.add_parser(name, help=help_, description=help_)
        s.set_defaults(fn=fn)
        s.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
        s.add_argument("--trust-remote-code", action="store_true", help="allow hub models to run their own code")
        return s

    from .factorizers import FACTORIZERS
    from .export import FORMATS
    from .methods import RANK_ALLOCATIONS, TARGETS
    from .rope import ROPE_STRATEGIES

    c = add("convert", _convert, "convert SOURCE (hub id, HF dir, .gguf, smollm2-135m) to MLA and save it to --out")
    c.add_argument("source")
    c.add_argument("--out", required=True, help="output directory (written atomically)")
    c.add_argument("--kv-budget", type=float, help="fraction of the source's cache values to keep, in (0, 1]")
    c.add_argument("--kv-lora-rank", type=int, help="latent width r (with --qk-rope-head-dim)")
    c.add_argument("--qk-rope-head-dim", type=int, help="shared rotated key width (multiple of 2*num_key_value_heads)")
    c.add_argument("--kv-values", type=int, help="absolute cache values per token per layer")
    c.add_argument("--method", choices=["exact", "svd", "lowrank"],
                   help="default: exact at full budget, lowrank (calibrated) below; svd is the weight-only baseline")
    c.add_argument("--rope", choices=list(ROPE_STRATEGIES),
                   help="lowrank: which key dims keep RoPE (default rorope; -fold2/-fold4 fold neighbouring "
                        "frequencies, not exportable)")
    c.add_argument("--factorizer", choices=list(FACTORIZERS), help="lowrank: latent factorizer (default output)")
    c.add_argument("--attn-moment", type=float,
                   help="lowrank: weight in [0, 1] of the attention-averaged input moment in the calibration "
                        "statistics (default 0.3; 0: token moment only)")
    c.add_argument("--rank-allocation", choices=list(RANK_ALLOCATIONS),
                   help="lowrank: per-layer latent ranks from each layer's spectrum and measured held-out "
                        "NLL cost, kept only if held-out NLL improves (native format only; default uniform)")
    c.add_argument("--sequential", action="store_true",
                   help="lowrank: statistics from the converted prefix, refit to the source's outputs (default one-shot)")
    c.add_argument("--calib", help="lowrank: calibration text file or name (default wikitext2-valid)")
    c.add_argument("--calib-samples", type=int, help="lowrank: calibration windows (default 32)")
    c.add_argument("--calib-seq-len", type=int, help="lowrank: tokens per calibration window (default 512)")
    c.add_argument("--rope-horizon", type=int,
                   help="lowrank: query-key distances over which a pair that loses RoPE is averaged (default 512)")
    c.add_argument("--latent-norm", action="store_true",
                   help="lowrank: fit the latent RMSNorm (kv_a_layernorm) stock DeepSeek-V3 engines apply")
    c.add_argument("--target", choices=list(TARGETS),
                   help="make every choice the export to this format can express (deepseek_v3: rope rorope-export, "
                        "latent norm, uniform ranks, no latent bias)")
    c.add_argument("--stream", action="store_true", help="convert a local sharded safetensors checkpoint layer by "
                   "layer in bounded memory (resumes if interrupted)")
    c.add_argument("--device", default="cpu", help="--stream: where the layers' calibration passes run (cpu, cuda)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    x = add("export", _export, "write a converted DIR as a stock DeepSeek-V3 checkpoint (transformers, vLLM, SGLang)")
    x.add_argument("model", help="a latentkv convert output")
    x.add_argument("--out", required=True, help="output directory (written atomically)")
    x.add_argument("--format", default="deepseek_v3", choices=list(FORMATS))
    x.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    v = add("verify-export", _verify_export, "load an export with stock transformers and compare it with our runtime")
    v.add_argument("out", help="a `latentkv export` output")
    v.add_argument("--against", required=True, help="the latentkv convert output it was exported from")
    v.add_argument("--text", help="sample text file or name (default: a built-in paragraph)")
    v.add_argument("--tokens", type=int, default=128, help="sample tokens compared")
    v.add_argument("--atol", type=float, default=1e-3, help="largest logit difference that passes (fp32)")

    lo = add("load", _load, "read a DeepSeek-V3 checkpoint (an export or anyone's) into the latentkv runtime")
    lo.add_argument("model")
    lo.add_argument("--out", help="also save it in latentkv's native format here")
    lo.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    e = add("eval", _eval, "perplexity and/or passkey retrieval of MODEL_OR_DIR")
    e.add_argument("model")
    e.add_argument("--ppl", help="perplexity on a UTF-8 text file, or wikitext2 / wikitext2-valid / ptb")
    e.add_argument("--seq-len", type=int, default=2048, help="window length in tokens")
    e.add_argument("--stride", type=int, help="slide windows by this many tokens (default: non-overlapping)")
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    e.add_argument("--passkey", action="store_true", help="synthetic passkey retrieval accuracy")
    e.add_argument("--context", default="1024,2048,4096", help="passkey prompt lengths in tokens")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey needle depths in [0, 1]")
    e.add_argument("--trials", type=int, default=3, help="passkey trials per context and depth")

    i = add("info", _info, "architecture and cache values/bytes per token of a model vs its source")
    i.add_argument("model")

    w = add("sweep", _sweep, "convert SOURCE with every method at every budget and evaluate each the same way")
    w.add_argument("source")
    w.add_argument("--out", required=True, help="directory for sweep.json, sweep.md and ppl_vs_cache.png")
    w.add_argument("--budgets", default="1,0.5,0.25,0.125", help="comma-separated KV budgets in (0, 1]")
    w.add_argument("--methods", default="lowrank,svd", help="comma-separated methods: lowrank, svd")
    w.add_argument("--ppl", default="wikitext2", help="evaluation text (file or wikitext2 / ptb)")
    w.add_argument("--seq-len", type=int, default=2048)
    w.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    w.add_argument("--passkey", help="also passkey accuracy at these contexts, e.g. 1024,2048")
    w.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    g = add("generate", _generate, "generate text with MODEL_OR_DIR (absorbed latent decode for converted models)")
    g.add_argument("model")
    g.add_argument("prompt", nargs="?", help="the prompt (or --batch-file)")
    g.add_argument("--batch-file", help="text file, one prompt per line, generated as one left-padded batch")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0)

    b = add("bench", _bench, "prefill time, decode tokens/s, memory and cache bytes: source vs converted")
    b.add_argument("model")
    b.add_argument("--against", help="the source model to compare with")
    b.add_argument("--context", default="1024,4096,8192,16384", help="context lengths in tokens")
    b.add_argument("--batch", default="1,4,16", help="batch sizes")
    b.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per row")
    b.add_argument("--out", default="bench-out", help="directory for bench.json and bench.png (written atomically)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    from .cli_more import add_doctor_parser, add_heal_parser

    add_heal_parser(add)
    add_doctor_parser(add)

    d = add("demo", _demo, "the main job: convert the bundled SmolLM2, compare cache size and perplexity")
    d.add_argument("--kv-budget", type=float, default=0.5, help="budget of the compressed variant")
    d.add_argument("--out", help="also save the compressed model here")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--max-windows", type=int, default=4)
    d.add_argument("--text", default="wikitext2", help="evaluation text (file or dataset name)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import LatentKVError

    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except LatentKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except OSError as e:
        from .errors import write_error

        if write_error(e) is None:
            raise
        print(f"error: {write_error(e)}", file=sys.stderr)
        return 2
    if getattr(args, "quiet", False):  # a non-zero rank of a distributed run
        return 0
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_human(args.cmd, result)
    return getattr(args, "exit_code", 0)


if __name__ == "__main__":
    sys.exit(main())
