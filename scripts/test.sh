#!/usr/bin/env bash
# The test suite: generated files are current, then every test (CPU: Triton's interpreter; TileLang's kernels
# compiled for sm_90a and run through its C target).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m sla_dsl generate --check
exec .venv/bin/python -m pytest -q -ra "$@"
