#!/usr/bin/env bash
# Build what bench/gpu.sh runs on the GPU machine (which has no Rust) and put it, stripped, in
# .gpu/ as one archive, .gpu/bundle.tar.xz, for the device tool to carry (64 MiB limit per call).
# CUDA 13 driver API.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDARC_CUDA_VERSION=13000
# A target dir of its own: the CUDA version feeds cudarc's build script, and flipping it in the
# CI target dir would rebuild everything there.
export CARGO_TARGET_DIR="${GPU_TARGET_DIR:-target}"
cargo build --release -p llm-bench
cargo build --release -p llm-server -p llm-cli -p llm-llama -p llm-qwen2
mkdir -p .gpu
for f in llm-bench llm-server llm libllama_backend.so libqwen2_backend.so; do
  cp "$CARGO_TARGET_DIR/release/$f" .gpu/
  strip .gpu/"$f"
done
# Five binaries of ~140 MB stripped; xz brings them to ~20 MB, under the carry limit.
tar -C .gpu -cf - llm-bench llm-server llm libllama_backend.so libqwen2_backend.so |
  xz -T0 -6 >.gpu/bundle.tar.xz
ls -la .gpu/bundle.tar.xz
