#!/usr/bin/env bash
# Re-resolve the two locks from pyproject.toml's ranges (newest releases that satisfy them), for Linux x86_64 and
# Python 3.11 (the project's machines). Run the tests on a fresh install through the new locks before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=$(command -v uv || true)
if [ -z "$uv" ]; then
  python3 -m venv "${TMPDIR:-/tmp}/uv-venv" && "${TMPDIR:-/tmp}/uv-venv/bin/pip" install --quiet uv
  uv="${TMPDIR:-/tmp}/uv-venv/bin/uv"
fi
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
"$uv" pip compile pyproject.toml --extra dev "${target[@]}" -o requirements/lock-dev.txt
"$uv" pip compile pyproject.toml --extra onnxruntime --extra serve "${target[@]}" -o requirements/lock-serve.txt
