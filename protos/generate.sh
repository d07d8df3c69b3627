#!/usr/bin/env bash
# Regenerates the Python stubs in protos/ from the .proto files (run from anywhere).
# The stubs are committed; tests/test_protos.py checks that they match the .proto files.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto
