#!/usr/bin/env bash
# The test suite on CPU, in parallel (one pytest-xdist worker per core, one torch thread each).
#   bash scripts/test.sh                      the default tier (at most 10 minutes on 2 cores)
#   bash scripts/test.sh -m slow              the slow tier (every family, model and spec product)
#   bash scripts/test.sh tests/test_ops.py    one file; -k NAME for one test; -n 0 for no workers
# MOECOMPILE_TEST_WORKERS sets the number of workers (default: one per core).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -n "${MOECOMPILE_TEST_WORKERS:-auto}" --dist worksteal "$@"
