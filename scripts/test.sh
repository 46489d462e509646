#!/usr/bin/env bash
# The whole check: proto lint + stub drift, ruff, mypy, then the pytest suite. What CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
make --no-print-directory protos-check
make --no-print-directory lint
make --no-print-directory typecheck
.venv/bin/python -m pytest -q "$@"
