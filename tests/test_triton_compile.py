"""Every generated Triton kernel of the six seed specs compiles for sm_90 (H100) with Triton's CUDA backend,
no GPU needed, at the default configs, and fits in the shared memory of one H100 CTA.

The interpreter (the other Triton tests) runs kernels without compiling them, so it cannot see what only the
compiler does: type checks of every return, layouts, and the shared memory a tile schedule needs. Both
failures the H100 showed once (a mismatched return in `_load_decay`, 319488 bytes of shared memory for
gdn's bwd_main) reproduce here, on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from sla_dsl.autotune import Shape
from sla_dsl.autotune.runner import call_arguments
from sla_dsl.backends.triton.runtime import TritonKernels
from sla_dsl.codegen import generated_module, seed_specs

SPECS = seed_specs()
H100_SHARED_MEMORY_BYTES = 227 * 1024  # the opt-in maximum of one CTA on sm_90
KERNELS = ("intra_kernel", "fwd_kernel", "bwd_dh_kernel", "bwd_main_kernel")
CASES = ((128, "bfloat16"), (64, "float32"))  # (K = V, dtype)


class SM90Driver:
    """What JITFunction.run asks of the active driver before compiling: an sm_90 target, device and stream."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def compile_defaults(spec_name: str) -> list[dict]:
    """Compiles the kernels of one seed spec at its default configs; one row per compiled kernel. Runs in a
    process where Triton was imported without TRITON_INTERPRET (the tests' conftest sets it, and Triton's
    own library functions are built as interpreted functions then)."""
    spec = next(s for s in SPECS if s.name == spec_name)
    driver.set_active(SM90Driver())
    kernels = TritonKernels(spec, generated_module(spec, "triton", f"{spec.name}.py"))
    rows = []
    for dim, dtype in CASES:
        shape = Shape(2, 4096, 4, dim, dim, dtype)
        positional, cu_seqlens, scale, do, dfinal = call_arguments(spec, Shape(2, 16, 4, dim, dim, dtype), "cpu")
        for phase in ("fwd", "bwd"):
            config = kernels.default_config(shape, phase)
            for name in KERNELS:
                getattr(kernels.module, name).device_caches.clear()
            if phase == "fwd":
                kernels.forward(*positional, cu_seqlens, scale, True, config=config, compile_only=True)
            else:
                kernels.backward(*positional, cu_seqlens, scale, do, dfinal, config=config, compile_only=True)
            for name in KERNELS:
                for compiled in getattr(kernels.module, name).device_caches[0][0].values():
                    rows.append({"kernel": name, "dim": dim, "dtype": dtype, "phase": phase, "config": config,
                                 "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps})
    return rows


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_triton_kernels_compile_for_sm90_within_shared_memory(spec):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, spec.name], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    # per shape: fwd, then fwd with states, bwd_dh and bwd_main; and intra in both phases where it is launched
    assert len(rows) >= 4 * len(CASES)
    for row in rows:
        assert row["shared"] <= H100_SHARED_MEMORY_BYTES, (
            f"{spec.name} {row['kernel']} at K=V={row['dim']} {row['dtype']} ({row['phase']} default "
            f"{row['config']}) needs {row['shared']} bytes of shared memory; an H100 CTA has "
            f"{H100_SHARED_MEMORY_BYTES}")


if __name__ == "__main__":
    print(json.dumps(compile_defaults(sys.argv[1])))
