#!/usr/bin/env bash
# Regenerates the Python stubs (messages, .pyi and gRPC) of protos/flashcrowd into gen/.
# Vendored google/* protos are not generated: googleapis-common-protos provides their modules.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf gen/flashcrowd
mkdir -p gen/flashcrowd
mapfile -t files < <(cd protos && find flashcrowd -name '*.proto' | LC_ALL=C sort)
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=gen --pyi_out=gen --grpc_python_out=gen "${files[@]/#/}"
# Packages, so that `flashcrowd.<service>.v1` imports resolve from gen/.
find gen/flashcrowd -type d -exec sh -c 'printf "" > "$1/__init__.py"' _ {} \;
echo "generated $(find gen/flashcrowd -name '*_pb2*.py*' | wc -l) files from ${#files[@]} protos"
