"""Serve a `latentkv export` with stock vLLM and compare its greedy outputs with our runtime.

    python scripts/vllm_check.py OUT --against DIR [--prompts FILE] [--max-new-tokens 32] [--json]

Needs a CUDA GPU and `pip install vllm`; elsewhere it prints why it skipped and exits 0, so it
can sit in any pipeline. Both sides run greedy in the same dtype on the GPU (default bfloat16,
which vLLM's MLA backends require); bf16 rounding may make long continuations diverge late, so
the report gives, per prompt, the tokens that agree before the first difference.
Exit code 1 when a prompt's first `--must-agree` tokens differ.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

PROMPTS = ["The capital of France is", "def fibonacci(n):", "In 1969, the first humans to walk on the Moon were",
           "A latent cache stores", "Water boils at a temperature of"]


def skip_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm)"
    return None


def vllm_tokens(out: str, prompts: list[str], new_tokens: int, dtype: str, kv_cache_dtype: str) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=out, dtype=dtype, trust_remote_code=False, enforce_eager=True, max_model_len=2048, seed=0,
              kv_cache_dtype=kv_cache_dtype)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


def our_tokens(against: str, prompts: list[str], new_tokens: int, dtype: str, kv_cache_dtype: str) -> list[list[int]]:
    import torch

    from latentkv import generate, load_model
    from latentkv.runtime.quant import CacheFormat

    model, tok = load_model(against)
    model.to(device="cuda", dtype=getattr(torch, dtype))
    # vLLM's fp8 MLA cache: latent and rope key in e4m3 with one per-tensor scale of 1.0
    fmt = CacheFormat("fp8_e4m3", rope=True) if kv_cache_dtype.startswith("fp8") else CacheFormat()
    return [generate(model, tok, p, new_tokens, use_eos=False, cache_dtype=fmt).tokens[0] for p in prompts]


def agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="a `latentkv export` directory")
    p.add_argument("--against", required=True, help="the latentkv convert output it came from")
    p.add_argument("--prompts", help="text file, one prompt per line (default: five built-in prompts)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--must-agree", type=int, default=8, help="leading tokens that must match for every prompt")
    p.add_argument("--attention-backend", help="sets VLLM_ATTENTION_BACKEND, e.g. TRITON_MLA or FLASHMLA")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="vLLM's cache dtype; fp8 is compared with our runtime's emulation of it")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    reason = skip_reason()
    if reason:
        print(json.dumps({"skipped": reason}) if a.json else f"skipped: {reason}")
        return 0
    if a.attention_backend:
        os.environ["VLLM_ATTENTION_BACKEND"] = a.attention_backend
    prompts = PROMPTS if not a.prompts else [x for x in open(a.prompts, encoding="utf-8").read().splitlines() if x]
    theirs = vllm_tokens(a.out, prompts, a.max_new_tokens, a.dtype, a.kv_cache_dtype)
    ours = our_tokens(a.against, prompts, a.max_new_tokens, a.dtype, a.kv_cache_dtype)
    rows = [{"prompt": q, "agree": agreement(x, y), "identical": x == y} for q, x, y in zip(prompts, theirs, ours)]
    result = {"rows": rows, "identical": sum(r["identical"] for r in rows), "prompts": len(rows),
              "passed": all(r["agree"] >= min(a.must_agree, a.max_new_tokens) for r in rows)}
    if a.json:
        print(json.dumps(result))
    else:
        for r in rows:
            print(f"{r['agree']:>3}/{a.max_new_tokens} tokens agree  {r['prompt']!r}")
        print(f"{result['identical']}/{len(rows)} identical; {'PASSED' if result['passed'] else 'FAILED'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
