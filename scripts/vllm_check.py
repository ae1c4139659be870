"""Serve a `latentkv export` with stock vLLM and compare its greedy outputs with our runtime
(`latentkv verify-export OUT --against DIR --engine vllm` is the same check; this script keeps the flags
scripts/gpu_check.sh uses).

    python scripts/vllm_check.py OUT --against DIR [--prompts FILE] [--max-new-tokens 32] [--json]

Needs a CUDA GPU and `pip install vllm`; elsewhere it prints why it skipped and exits 0.
Exit code 1 when a prompt's first `--must-agree` tokens differ.
"""

from __future__ import annotations

import argparse
import json
import sys

from latentkv.reports.engine import verify_with_vllm


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
    prompts = None if not a.prompts else [x for x in open(a.prompts, encoding="utf-8").read().splitlines() if x]
    result = verify_with_vllm(a.out, a.against, prompts, a.max_new_tokens, a.dtype, a.must_agree, a.kv_cache_dtype,
                              a.attention_backend)
    if a.json:
        print(json.dumps(result))
    elif "skipped" in result:
        print(f"skipped: {result['skipped']}")
    else:
        for r in result["rows"]:
            print(f"{r['agree']:>3}/{a.max_new_tokens} tokens agree  {r['prompt']!r}")
        print(f"{result['identical']}/{len(result['rows'])} identical; {'PASSED' if result['passed'] else 'FAILED'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
