#!/usr/bin/env bash
# Creates .venv (once) with everything sla-dsl needs. torch is installed first and pinned: a bare `torch`
# requirement would pull gigabytes of CUDA packages on a CPU machine. Where a torch is already importable
# (a GPU machine's CUDA build), the venv inherits it instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  if python3 -c "import torch, torch.cuda; assert torch.cuda.is_available()" 2>/dev/null; then
    python3 -m venv --system-site-packages .venv
  else
    python3 -m venv .venv
  fi
fi
py=.venv/bin/python
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==${SLA_DSL_TORCH_VERSION:-2.13.0}"
"$py" -m pip install -q -e ".[test,tilelang]"
