#!/usr/bin/env bash
# Print the path of a virtualenv holding tests/python/requirements.txt (grpcurl, grpcio,
# grpcio-tools), creating it on first use. Keyed by the requirements' hash; safe to run
# concurrently (flock). Nothing is installed system-wide.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
req="$root/tests/python/requirements.txt"
cache="${LLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-serve}"
key=$(sha256sum "$req" | cut -c1-12)
venv="$cache/venv-$key"
mkdir -p "$cache"
exec 9>"$cache/.venv.lock"
flock 9
if [ ! -x "$venv/bin/grpcurl" ] || [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
  touch "$venv/.complete"
fi
echo "$venv"
