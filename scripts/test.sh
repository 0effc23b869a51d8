#!/usr/bin/env bash
# The test suite: generated files are current, then every test (CPU: Triton's interpreter; TileLang's kernels
# compiled for sm_90a and run through its C target).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m sla_dsl generate --check
# one worker per core, tests dealt out one by one: the TileLang compiles and the CPU emulation dominate, and one
# file's sm_90a compile cases would hold a single worker (cold caches, two cores, same commit: 24.4 min this way,
# 28.4 min with --dist loadfile)
exec .venv/bin/python -m pytest -q -ra -n auto --dist load "$@"
