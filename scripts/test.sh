#!/usr/bin/env bash
# The test suite (CPU; slow cases are deselected by default, run them with: scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
