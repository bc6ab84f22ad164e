#!/usr/bin/env bash
# Build what bench/gpu.sh runs on the GPU machine (which has no Rust) and put it, stripped, in
# .gpu/ as one archive, .gpu/bundle.tar.xz, for the device tool to carry (64 MiB limit per call).
# CUDA 13 driver API.
#   bench/build-gpu.sh        llm-bench, server, CLI, llama + qwen2 plugins (tiny|kernel|smoke)
#   bench/build-gpu.sh full   server, CLI, all five plugins, llm-bench, and the bitsandbytes
#                             wheel for the peer (full|models; ~61 MB carried in all)
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDARC_CUDA_VERSION=13000
# A target dir of its own: the CUDA version feeds cudarc's build script, and flipping it in the
# CI target dir would rebuild everything there.
export CARGO_TARGET_DIR="${GPU_TARGET_DIR:-target}"
mkdir -p .gpu
if [ "${1:-}" = full ]; then
  files=(llm-server llm llm-bench libllama_backend.so libphi3_backend.so libgemma2_backend.so
    libqwen2_backend.so libmixtral_backend.so)
  cargo build --release -p llm-bench
  cargo build --release -p llm-server -p llm-cli -p llm-llama -p llm-phi3 -p llm-gemma2 \
    -p llm-qwen2 -p llm-mixtral
  # The peer's bitsandbytes with only its CUDA 13 libraries (the device's torch is built for
  # CUDA 13): 43 MB -> 7 MB, so the wheel, five plugins and the tree fit one carry (64 MiB).
  if ! ls .gpu/bitsandbytes-*.whl >/dev/null 2>&1; then
    pip download -q bitsandbytes==0.50.2 --no-deps -d .gpu/
  fi
  # Also trims a wheel an earlier version of this script left (zip exits 12 when nothing matches).
  zip -q -d .gpu/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda11*' \
    'bitsandbytes/libbitsandbytes_cuda121.so' 'bitsandbytes/libbitsandbytes_cuda124.so' \
    'bitsandbytes/libbitsandbytes_cuda126.so' 'bitsandbytes/libbitsandbytes_cuda128.so' \
    'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*' || true
else
  files=(llm-bench llm-server llm libllama_backend.so libqwen2_backend.so)
  cargo build --release -p llm-bench
  cargo build --release -p llm-server -p llm-cli -p llm-llama -p llm-qwen2
fi
for f in "${files[@]}"; do
  cp "$CARGO_TARGET_DIR/release/$f" .gpu/
  strip .gpu/"$f"
done
# Binaries of ~140 MB stripped; xz brings them to ~20 MB, under the carry limit.
tar -C .gpu -cf - "${files[@]}" | xz -T0 -6 >.gpu/bundle.tar.xz
ls -la .gpu/bundle.tar.xz .gpu/*.whl 2>/dev/null || true
