"""`verify-export --engine vllm`: serve an export with stock vLLM and compare its greedy tokens with our runtime.

Needs a CUDA GPU and `pip install vllm`; elsewhere the result says why it skipped (`skipped`), so it
can sit in any pipeline. Both sides run greedy in the same dtype on the GPU (default bfloat16, which
vLLM's MLA backends require); bf16 rounding may make long continuations diverge late, so the report
gives, per prompt, the tokens that agree before the first difference. With `kv_cache_dtype` fp8 vLLM
stores its MLA cache in e4m3 (one per-tensor scale of 1.0) and our side emulates exactly that
(`CacheFormat("fp8_e4m3", rope=True)`).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..loading import load_model
from ..runtime.generation import generate
from ..runtime.quant import CacheFormat

PROMPTS = ["The capital of France is", "def fibonacci(n):", "In 1969, the first humans to walk on the Moon were",
           "A latent cache stores", "Water boils at a temperature of"]


def skip_reason() -> str | None:
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
    model, tok = load_model(against, dtype=dtype)
    model.to("cuda")
    fmt = CacheFormat("fp8_e4m3", rope=True) if kv_cache_dtype.startswith("fp8") else CacheFormat()
    return [generate(model, tok, p, new_tokens, use_eos=False, cache_dtype=fmt).tokens[0] for p in prompts]


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy continuations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def verify_with_vllm(out, against, prompts: list[str] | None = None, new_tokens: int = 32, dtype: str = "bfloat16",
                     must_agree: int = 8, kv_cache_dtype: str = "auto", attention_backend: str | None = None) -> dict:
    """-> {rows [{prompt, agree, identical}], identical, prompts, passed} or {skipped: reason}."""
    reason = skip_reason()
    if reason:
        return {"skipped": reason, "passed": True}
    if attention_backend:
        os.environ["VLLM_ATTENTION_BACKEND"] = attention_backend
    prompts = prompts or PROMPTS
    theirs = vllm_tokens(str(out), prompts, new_tokens, dtype, kv_cache_dtype)
    ours = our_tokens(str(against), prompts, new_tokens, dtype, kv_cache_dtype)
    rows = [{"prompt": q, "agree": agreement(x, y), "identical": x == y} for q, x, y in zip(prompts, theirs, ours)]
    return {"engine": "vllm", "rows": rows, "identical": sum(r["identical"] for r in rows), "prompts": len(rows),
            "kv_cache_dtype": kv_cache_dtype, "passed": all(r["agree"] >= min(must_agree, new_tokens) for r in rows)}
