#!/usr/bin/env bash
# The main job: compile a built-in MoE model, show what was found and how fast it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m moecompile.tools.demo "$@"
