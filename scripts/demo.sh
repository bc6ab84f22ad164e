#!/usr/bin/env bash
# Build, fetch the default model (SmolLM2-135M-Instruct), start llm-server with it, and stream the
# answer to the seed's chat through the `llm` CLI. The server stops when the answer is done.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/llm-serve/target}"
cargo build --release --workspace --quiet
model=$(scripts/fetch-default-model.sh)
bin="$CARGO_TARGET_DIR/release"
addr="${LLM_DEMO_ADDR:-127.0.0.1:50051}"
"$bin/llm-server" --listen "$addr" --load "smollm2=$model" >/dev/null 2>"${TMPDIR:-/tmp}/llm-server-demo.log" &
server=$!
trap 'kill $server 2>/dev/null' EXIT
# Wait until the model is loaded.
for _ in $(seq 1 600); do
  "$bin/llm" --server "http://$addr" models 2>/dev/null | grep -q '^smollm2 ' && break
  kill -0 $server 2>/dev/null || { cat "${TMPDIR:-/tmp}/llm-server-demo.log" >&2; exit 1; }
  sleep 0.2
done
"$bin/llm" --server "http://$addr" generate --model smollm2 \
  --system "You are a helpful assistant" \
  --user "Tell a light-hearted joke for a room of Data Scientists" \
  --max-new-tokens 80 --stats
