#!/usr/bin/env bash
# Creates .venv with the locked dependencies and installs buf (npm). Safe to re-run; no stdin needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! command -v uv >/dev/null 2>&1; then
  echo "setup: installing uv (Python package manager) with pip" >&2
  "$PYTHON" -m pip install --quiet --disable-pip-version-check uv
fi
uv sync --frozen --python "$PYTHON" --quiet
if [ ! -x node_modules/.bin/buf ]; then
  echo "setup: installing buf from npm" >&2
  npm ci --no-audit --no-fund --silent
fi
