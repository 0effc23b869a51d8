#!/usr/bin/env bash
# The test suite: generated files are current, then every test (CPU: Triton's interpreter; TileLang's kernels
# compiled for sm_90a and run through its C target).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m sla_dsl generate --check
# one worker per core, a test file per worker at a time (the TileLang compiles and the CPU emulation dominate)
exec .venv/bin/python -m pytest -q -ra -n auto --dist loadfile "$@"
