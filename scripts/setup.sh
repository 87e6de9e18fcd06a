#!/usr/bin/env bash
# Create .venv with torch (CPU build 2.13.0 unless a supported torch is already there) and
# moecompile with its test extras. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c 'import torch, sys; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if (2, 11) <= v <= (2, 13) else 1)' 2>/dev/null; then
    # Pin the release so pip takes the CPU wheel where one is provided, not the newest CUDA build.
    "$VPY" -m pip install -q torch==2.13.0
fi
if ! "$VPY" -c 'import moecompile, transformers, pytest, xdist, hypothesis, matplotlib, pulp, highspy, triton' 2>/dev/null; then
    "$VPY" -m pip install -q -e ".[test]"
fi
