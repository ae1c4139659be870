#!/usr/bin/env bash
# The GPU checks, in one short run for a lent GPU machine (see the `device` tool):
#   bash scripts/gpu_check.sh [OUT]          (OUT: where results go; default runs/gpu-check)
# Without a CUDA GPU it prints one "skipped: ..." line and exits 0 (CI runs that path).
# With one: a 50 % export-grade SmolLM2 conversion (CPU math), its DeepSeek-V3 export, verify-export,
# then vLLM against our runtime (bf16, and vLLM's fp8 MLA cache against our fp8 emulation) when vLLM
# is installed. Every step's JSON goes to OUT; the first failure stops the run.
set -euo pipefail
OUT="${1:-runs/gpu-check}"
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "skipped: no CUDA GPU on this machine"
  exit 0
fi
mkdir -p "$OUT"
"$PY" -m latentkv convert smollm2-135m --out "$OUT/kv50" --kv-budget 0.5 --target deepseek_v3 --overwrite --json > "$OUT/convert.json"
"$PY" -m latentkv export "$OUT/kv50" --out "$OUT/ds" --overwrite --json > "$OUT/export.json"
"$PY" -m latentkv verify-export "$OUT/ds" --against "$OUT/kv50" --json > "$OUT/verify.json"
"$PY" scripts/vllm_check.py "$OUT/ds" --against "$OUT/kv50" --json > "$OUT/vllm-bf16.json"
"$PY" scripts/vllm_check.py "$OUT/ds" --against "$OUT/kv50" --kv-cache-dtype fp8 --json > "$OUT/vllm-fp8.json"
echo "done: $OUT"
