#!/usr/bin/env bash
# Installs lightning-reshape with its test extra into the current Python.
# torch: keep whatever build is already installed (e.g. your CUDA build); where there is
# none, install the CPU build 2.13.0 so pip never pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
