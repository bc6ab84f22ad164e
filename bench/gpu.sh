#!/usr/bin/env bash
# GPU checks and benchmarks, run on the device machine in one call (see docs/benchmarks.md).
# Expects what `bench/build-gpu.sh` builds here: .gpu/bundle.tar.xz (carried, not committed)
# with llm-bench, llm-server, llm, libllama_backend.so, libqwen2_backend.so.
#   bench/gpu.sh [tiny|shapes|kernel|prefill|upload|layout|sweep|gemv|gemv_full|fused|smoke|full|models|ab_gemm|cycles|all]
# `full` and `models` (not part of `all`) need `bench/build-gpu.sh full`: all five plugins and the
# bitsandbytes wheel in .gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bench-out}"
mkdir -p "$OUT"
what="${1:-all}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
export CUBECL_DEBUG_LOG=0
# TRACE_TUNE=1: CubeCL logs every autotune (its key and candidates' times) and every kernel
# compile to the processes' stderr (the servers' logs, copied to $OUT at exit), interleaved
# with the scheduler's "slow step" lines: which shapes a slow step tuned or compiled.
if [ "${TRACE_TUNE:-0}" = 1 ]; then
  unset CUBECL_DEBUG_LOG
  printf '[autotune.logger]\nlevel = "full"\nstderr = true\n[compilation.logger]\nlevel = "basic"\nstderr = true\n' >cubecl.toml
fi
# llm-bench's kernel cache: later modes on the same (warm) machine skip the kernel compiles.
export LLM_BENCH_KERNEL_CACHE="${LLM_BENCH_KERNEL_CACHE:-/tmp/llm-bench-kernels}"
# Keep cubecl's autotune/kernel cache inside the run.
export HOME="${HOME:-/root}"
# cuBLAS for prefill GEMMs (loaded at run time): the CUDA toolkit's, or the one PyTorch's
# wheels bring (nvidia/cu13/lib or nvidia/cublas/lib). Without it prefill stays on Burn's matmul.
cublas_dir="$(python3 - <<'PY' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
for r in roots:
    for pat in ("libcublas.so.13*", "nvidia/*/lib/libcublas.so.13*", "nvidia/cublas/lib/libcublas.so.13*"):
        hits = glob.glob(os.path.join(r, pat))
        if hits:
            print(os.path.dirname(hits[0])); raise SystemExit
PY
)"
if [ -n "$cublas_dir" ]; then
  export LD_LIBRARY_PATH="$cublas_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "cuBLAS from $cublas_dir" | tee "$OUT/cublas.txt"
  # CUPTI finds CubeCL's stream for cuBLAS (llm_core::driver); without it cuBLAS stays off.
  ls "$cublas_dir" | grep -i cupti | tee -a "$OUT/cublas.txt"
else
  echo "cuBLAS not found: prefill on Burn's matmul" | tee "$OUT/cublas.txt"
fi
[ -f .gpu/bundle.tar.xz ] && tar -C .gpu -xJf .gpu/bundle.tar.xz
# Compiled kernels from an earlier call (this script leaves them in $OUT/kernels.tar.xz; copy it
# to .gpu/ and carry it): the machine is handed back after a short idle and a fresh one would
# compile them all again (minutes). Entries are keyed by the kernels' source, so stale ones are
# never used.
if [ -f .gpu/kernels.tar.xz ]; then
  tar -C / -xJf .gpu/kernels.tar.xz && echo "kernel caches from .gpu/kernels.tar.xz"
fi
save_kernels() {
  local dirs=()
  for d in /tmp/llm-bench-kernels /tmp/llm-kernels; do [ -d "$d" ] && dirs+=("${d#/}"); done
  [ ${#dirs[@]} -gt 0 ] && tar -C / -cf - "${dirs[@]}" | xz -T0 -6 >"$OUT/kernels.tar.xz"
  ls -la "$OUT/kernels.tar.xz" 2>/dev/null
  # The servers' whole logs (full.py and the others print only their tails).
  for f in /tmp/server-*.log; do [ -f "$f" ] && xz -T0 -c "$f" >"$OUT/$(basename "$f").xz"; done
}
trap save_kernels EXIT
chmod +x .gpu/* 2>/dev/null
if { [ "$what" = full ] && [ "${SKIP_FUSED:-0}" != 1 ]; } || [ "$what" = fused ]; then
  # The fused per-layer kernels against the CPU path first: a full run of wrong kernels is void.
  timeout 120 .gpu/llm-bench fused 2>"$OUT/fused.stderr" | tee "$OUT/fused.jsonl"
  echo "llm-bench fused exit: ${PIPESTATUS[0]}"
  tail -5 "$OUT/fused.stderr"
fi
if [ "$what" = tiny ] || [ "$what" = all ] || [ "$what" = kernel ] || [ "$what" = prefill ] || [ "$what" = upload ] || [ "$what" = layout ]; then
  # One file per mode: a tiny run and a kernel run in one call must not overwrite each other.
  timeout "${BENCH_TIMEOUT:-400}" .gpu/llm-bench "$what" 2>"$OUT/bench-$what.stderr" | tee "$OUT/bench-$what.jsonl"
  echo "llm-bench exit: ${PIPESTATUS[0]}"
  tail -20 "$OUT/bench-$what.stderr"
fi
if [ "$what" = shapes ]; then
  timeout "${BENCH_TIMEOUT:-400}" python3 bench/shapes.py 2>"$OUT/shapes.stderr" | tee "$OUT/shapes.jsonl"
  echo "shapes exit: ${PIPESTATUS[0]}"
  tail -20 "$OUT/shapes.stderr"
fi
if [ "$what" = sweep ]; then
  timeout 400 .gpu/llm-bench sweep 2>"$OUT/sweep.stderr" | tee "$OUT/sweep.jsonl" | grep -v nf4_gemv_sweep
  echo "llm-bench sweep exit: ${PIPESTATUS[0]}"
fi
if [ "$what" = gemv ]; then
  # Each batch-1 GEMV launch timed by Nsight Compute (the kernel alone, clocks left alone).
  timeout 300 ncu --clock-control none --kernel-name regex:nf4_gemv \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
    .gpu/llm-bench gemv >"$OUT/ncu-gemv.csv" 2>"$OUT/ncu-gemv.stderr"
  echo "ncu exit: $?"
  python3 bench/ncu_gemv.py "$OUT/ncu-gemv.csv" | tee "$OUT/gemv.jsonl"
fi
if [ "$what" = gemv_full ]; then
  # Nsight Compute's full set (occupancy, registers, warp stall reasons, pipe use, SASS) on two
  # launches of the batch-1 GEMV at 14336x4096 (launches 23-24 of `llm-bench gemv`, whose 21-40
  # are that shape): what bounds the kernel, not only how long it takes.
  timeout 300 ncu --clock-control none --kernel-name regex:nf4_gemv --launch-skip 22 \
    --launch-count 2 --set full --import-source yes -o "$OUT/gemv-full" \
    .gpu/llm-bench gemv >"$OUT/ncu-gemv-full.stdout" 2>"$OUT/ncu-gemv-full.stderr"
  echo "ncu exit: $?"
  ncu -i "$OUT/gemv-full.ncu-rep" --page details --csv >"$OUT/gemv-full-details.csv"
  ncu -i "$OUT/gemv-full.ncu-rep" --page source --print-source sass --csv \
    >"$OUT/gemv-full-sass.csv" 2>"$OUT/gemv-full-sass.stderr"
  grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|Memory Throughput|DRAM Throughput|No Eligible|Executed Ipc" \
    "$OUT/gemv-full-details.csv" | cut -c1-220
fi
if [ "$what" = smoke ] || [ "$what" = all ]; then
  timeout 150 python3 bench/smoke.py 2>"$OUT/smoke.stderr" | tee "$OUT/smoke.jsonl"
  echo "smoke exit: ${PIPESTATUS[0]}"
  tail -20 "$OUT/smoke.stderr"
fi
if [ "$what" = cycles ]; then
  timeout "${FULL_TIMEOUT:-480}" python3 bench/cycles.py 2>"$OUT/cycles.stderr" | tee "$OUT/cycles.jsonl"
  echo "cycles exit: ${PIPESTATUS[0]}"
  tail -30 "$OUT/cycles.stderr"
fi
if [ "$what" = models ]; then
  python3 -m pip install --no-index --no-deps -q .gpu/bitsandbytes-*.whl 2>&1 | tail -2
  timeout "${FULL_TIMEOUT:-520}" python3 bench/models.py 2>"$OUT/models.stderr" | tee "$OUT/models.jsonl"
  echo "models exit: ${PIPESTATUS[0]}"
  tail -60 "$OUT/models.stderr"
fi
if [ "$what" = ab_gemm ]; then
  timeout "${FULL_TIMEOUT:-480}" python3 bench/ab_gemm.py 2>"$OUT/ab_gemm.stderr" | tee "$OUT/ab_gemm.jsonl"
  echo "ab_gemm exit: ${PIPESTATUS[0]}"
  tail -20 "$OUT/ab_gemm.stderr"
fi
if [ "$what" = full ]; then
  python3 -m pip install --no-index --no-deps -q .gpu/bitsandbytes-*.whl 2>&1 | tail -2
  python3 -c 'import bitsandbytes as b; print("bitsandbytes", b.__version__)'
  timeout "${FULL_TIMEOUT:-520}" python3 bench/full.py 2>"$OUT/full.stderr" | tee "$OUT/full.jsonl"
  echo "full exit: ${PIPESTATUS[0]}"
  tail -40 "$OUT/full.stderr"
fi
