"""Every generated Triton kernel of the six seed specs compiles for sm_90 (H100) with Triton's CUDA backend,
no GPU needed, at the default configs, and fits in the shared memory of one H100 CTA.

The interpreter (the other Triton tests) runs kernels without compiling them, so it cannot see what only the
compiler does. Both failures the H100 showed once (a mismatched return in `_load_decay`, 319488 bytes of
shared memory for gdn's bwd_main) reproduce here, on CPU (sla_dsl.backends.triton.offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sla_dsl.backends import SM90_SHARED_MEMORY_BYTES as H100_SHARED_MEMORY_BYTES
from sla_dsl.codegen import seed_specs

SPECS = seed_specs()
CASES = ((128, "bfloat16"), (64, "float32"))  # (K = V, dtype)


def compile_rows(spec_name: str, dim: int, dtype: str) -> list[dict]:
    # a process without TRITON_INTERPRET, which the tests' conftest sets
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "sla_dsl.backends.triton.offline", spec_name, str(dim), dtype],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_triton_kernels_compile_for_sm90_within_shared_memory(spec):
    for dim, dtype in CASES:
        rows = compile_rows(spec.name, dim, dtype)
        # fwd, then fwd with states, bwd_dh and bwd_main; and intra in both phases where it is launched
        assert len(rows) >= 4
        for row in rows:
            print(f"{spec.name} {row['kernel']} K=V={dim} {dtype} {row['phase']}: shared {row['shared']} B, "
                  f"{row['registers']} registers, stack {row['stack']} B")
            assert row["shared"] <= H100_SHARED_MEMORY_BYTES, (
                f"{spec.name} {row['kernel']} at K=V={dim} {dtype} ({row['phase']} default {row['config']}) "
                f"needs {row['shared']} bytes of shared memory; an H100 CTA has {H100_SHARED_MEMORY_BYTES}")
