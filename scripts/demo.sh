#!/usr/bin/env bash
# The main job: generate the seed specs' kernels and run them forward and backward on a small workload.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m sla_dsl demo "$@"
