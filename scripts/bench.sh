#!/usr/bin/env bash
# Sets up the environment, then runs the step-throughput benchmark (the main job).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m fastloop.bench "$@"
