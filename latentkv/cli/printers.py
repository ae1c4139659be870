"""Human-readable output of each subcommand (what --json replaces): the only module that formats results."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from ..reports.sweep import markdown


def print_result(cmd: str, result: dict, command: str) -> None:
    PRINTERS.get(cmd, print_plain)(result, command)


def print_generate(result: dict, command: str) -> None:
    if not result["streamed"]:
        for prompt, text in zip(result["prompts"], result["texts"]):
            print(f"{prompt}{text}")
    print(f"[{result['decode_tokens_per_s']:.1f} tokens/s decode, prefill {result['prefill_s']:.2f}s, "
          f"cache {result['cache_bytes']:,} bytes]", file=sys.stderr)


def print_bench(result: dict, command: str) -> None:
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


def print_sweep(result: dict, command: str) -> None:
    print(markdown(result, command))
    print(f"written to {result['out']} (sweep.json, sweep.md, ppl_vs_cache.png)")


def print_verify(result: dict, command: str) -> None:
    if "skipped" in result:
        print(f"skipped: {result['skipped']}")
        return
    if result.get("engine") == "vllm":
        for r in result["rows"]:
            print(f"{r['agree']:>3} tokens agree  {r['prompt']!r}")
        print(f"vLLM: {result['identical']}/{result['prompts']} identical; {'PASSED' if result['passed'] else 'FAILED'}")
        return
    verdict = "PASSED" if result["passed"] else "FAILED"
    print(f"{verdict}: max |logit diff| {result['max_abs_diff']:.2e} (atol {result['atol']:g}) over "
          f"{result['tokens']} tokens, greedy agreement {result['greedy_agreement']:.1%}, greedy generation "
          f"{'identical' if result['generation_match'] else 'DIFFERS'}, stock cache "
          f"{result['cache_bytes_per_token']:,} bytes/token (latent: {result['expected_cache_bytes_per_token']:,})")
    folds = result.get("folded_biases")
    if folds:
        ways = ", ".join(f"{k.replace('_', ' ')}: {folds[k]}" for k in ("query_bias", "rope_key_bias", "value_bias")
                         if k in folds)
        print(f"approximated in the conversion, not by the engine: the source's attention biases in {folds['layers']} "
              f"layers ({ways}); a linear fold misses {folds['constant_residual']:.1%} of a bias on calibration "
              f"inputs, kv_b refit error {folds['kv_b_relative_error']:.2%}; compare `latentkv eval` of the export "
              f"with the source for its cost")


def print_cache(result: dict, command: str) -> None:
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


def print_heal(r: dict, command: str) -> None:
    if r.get("local"):
        layers = r["local"]["layers"]
        mean = lambda k: sum(x[k] for x in layers) / len(layers)  # noqa: E731
        print(f"local stage: attention-output error {mean('before'):.4f} -> {mean('after'):.4f} (mean of "
              f"{len(layers)} layers) in {r['local']['seconds']}s")
    if r["steps"]:
        print(f"distilled {r['tokens']:,} tokens in {r['steps']} steps ({r['tokens_per_s']} tokens/s, "
              f"{r['seconds']}s): loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
    print(f"saved {r['out']}")


def print_doctor(r: dict, command: str) -> None:
    marks = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
    for c in r["checks"]:
        fix = f"  -> {c['fix']}" if c["fix"] else ""
        print(f"[{marks[c['status']]}] {c['name']}: {c['detail']}{fix}")
    print("ready" if r["ok"] else "not ready: fix the FAIL lines above")


def print_accelerate_config(r: dict, command: str) -> None:
    print(r["path"] if "path" in r else "\n".join(r["configs"]))


def print_plain(result: dict, command: str) -> None:
    for k, v in result.items():
        if k in SECTIONS:
            SECTIONS[k](v)
            continue
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


def _passkey(v: dict) -> None:
    found = f", key as the answer's first number {v['found_accuracy']:.1%}" if "found_accuracy" in v else ""
    print(f"passkey accuracy: {v['accuracy']:.1%} (strict){found}")
    for row in v["rows"]:
        extra = f"  (number: {row['found']}/{row['trials']})" if "found" in row else ""
        print(f"  context {row['context']:>6}  depth {row['depth']:.2f}  {row['correct']}/{row['trials']}{extra}")


def _copy(v: dict) -> None:
    print(f"copy probe accuracy: {v['accuracy']:.1%} (NLL {v['nll']:.3f})")
    for row in v["rows"]:
        print(f"  length {row['length']:>5}  distance {row['distance']:>5}  {row['accuracy']:.1%}  NLL {row['nll']:.3f}")


def _suite(v: dict) -> None:
    print(f"dev suite ({v['max_windows']} windows x {v['seq_len']} tokens per domain):")
    for name, d in v["domains"].items():
        print(f"  {name:>10}  ppl {d['ppl']:9.3f}  ({d['tokens']:,} tokens)")
    if "copy" in v:
        _copy(v["copy"])


def _split_search(v: dict | None) -> None:
    """The split search as a short table (the whole record, with per-layer detail, is in --json)."""
    v = v or {}
    if "kv_lora_rank" not in v:
        print("split search: not run (dims given, or a method without calibration)")
    else:
        print("split search on held-out calibration windows (lowest NLL wins; copy NLL breaks near-ties):")
        print(f"  {'strategy':<13} {'rope':>5} {'latent':>7} {'held-out NLL':>13} {'copy NLL':>9} {'score':>8}")
        key = ("rope", "kv_lora_rank", "qk_rope_head_dim")
        for c in v.get("candidates") or [v]:
            pick = all(c.get(k) == v.get(k) for k in key)
            print(f"  {c.get('rope', '-'):<13} {c['qk_rope_head_dim']:>5} {c['kv_lora_rank']:>7} {c['heldout_nll']:>13.4f} "
                  f"{c.get('copy_nll', float('nan')):>9.4f} {c.get('score', c['heldout_nll']):>8.4f}"
                  f"{'  <- chosen' if pick else ''}")
    alloc = v.get("allocation")
    if alloc:
        kept = f", exact layers {alloc['protected']}" if alloc.get("protected") else ""
        print(f"  rank allocation: {alloc['used']}{kept} (held-out score {alloc['heldout_score_allocated']:.4f}, "
              f"uniform {alloc['heldout_score_uniform']:.4f})")
    if v.get("latent_norm"):
        print("  latent norm: fitted (export-grade kv_a_layernorm)")


def _tasks(v: dict) -> None:
    limit = f", first {v['limit']} documents each" if v.get("limit") else ""
    print(f"lm-eval tasks (zero-shot{limit}):")
    for name, scores in v["scores"].items():
        shown = "  ".join(f"{k} {x:.4f}" for k, x in scores.items())
        print(f"  {name:<24} {shown}  ({v['docs'].get(name, '?')} docs)")


SECTIONS = {"passkey": _passkey, "copy": _copy, "suite": _suite, "split_search": _split_search, "tasks": _tasks}


def print_demo(result: dict, command: str) -> None:
    table = Table(title=f"{result['model']}: KV cache and WikiText-2 perplexity "
                        f"({result['max_windows']} windows x {result['seq_len']} tokens)")
    for col in ("variant", "values/tok/layer", "bytes/token", "vs source", "ppl", "convert s"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in result["rows"]:
        ppl = f"{r['ppl']:.3f}" if r["ppl"] is not None else "n/a"
        conv = f"{r['convert_seconds']:.1f}" if r["convert_seconds"] is not None else "-"
        table.add_row(r["variant"], str(r["cache_values_per_token_per_layer"]), f"{r['cache_bytes_per_token']:,}",
                      f"{r['ratio']:.1%}", ppl, conv)
    console = Console(width=max(100, Console().width))
    console.print(table)
    if result["ppl_missing_reason"]:
        console.print(f"ppl column empty: {result['ppl_missing_reason']}")
    if result["saved"]:
        console.print(f"saved the budget conversion to {result['saved']} (try `latentkv info {result['saved']}`)")
    console.print("bytes/token: cache bytes per token over all layers at the model's dtype.")
    calib = {"mix": "the domain mixture", None: "no text"}.get(result.get("calib"), result.get("calib"))
    console.print(f"total {result['seconds']}s. The exact row shows the conversion itself is lossless; "
                  f"the lowrank row is training-free (calibrated on {calib}), before any healing.")


def print_push(r: dict, command: str) -> None:
    for f in r["files"]:
        print(f"{f['bytes']:>14,}  {f['path']}")
    verb = "would upload" if r["dry_run"] else "uploaded"
    print(f"{verb} {len(r['files'])} files, {r['bytes']:,} bytes, to {'private ' if r['private'] else ''}model repo "
          f"{r['repo_id']}" + (f": {r['url']}" if r.get("url") else ""))


PRINTERS = {"push": print_push, "generate": print_generate, "bench": print_bench, "sweep": print_sweep, "verify-export": print_verify,
            "info": print_cache, "load": print_cache, "heal": print_heal, "doctor": print_doctor,
            "demo": print_demo, "accelerate-config": print_accelerate_config}
