#!/usr/bin/env bash
# GPU checks and benchmarks, run on the device machine in one call (see docs/benchmarks.md).
# Expects the binaries built here with `bench/build-gpu.sh` in .gpu/ (carried, not committed).
#   bench/gpu.sh [tiny|kernel|all]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bench-out}"
mkdir -p "$OUT"
what="${1:-all}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
export CUBECL_DEBUG_LOG=0
# Keep cubecl's autotune/kernel cache inside the run.
export HOME="${HOME:-/root}"
chmod +x .gpu/* 2>/dev/null
if [ "$what" = tiny ] || [ "$what" = all ] || [ "$what" = kernel ]; then
  timeout 900 .gpu/llm-bench "$what" 2>"$OUT/bench.stderr" | tee "$OUT/bench.jsonl"
  echo "llm-bench exit: ${PIPESTATUS[0]}"
  tail -20 "$OUT/bench.stderr"
fi
