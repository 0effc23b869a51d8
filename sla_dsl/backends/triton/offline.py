"""Compiling the generated Triton kernels for sm_90 (H100) on a machine without a GPU, and reading what each
compiled kernel uses: shared memory, registers and the local-memory stack that register spills go to.

The interpreter runs kernels without compiling them, so it cannot see what only the compiler does: type
checks of every return, layouts, shared memory, spills. Triton's CUDA backend compiles on CPU when the
active driver names an sm_90 target. Must run in a process that imported Triton without TRITON_INTERPRET
(Triton builds its own library functions as interpreted ones otherwise). CONFIG, a JSON object of settings
that replace the default config's (keys of either phase, e.g. '{"BT": 64, "states_BK": 128}'), compiles others.

    python -m sla_dsl.backends.triton.offline SPEC [K] [dtype] [CONFIG]     one line per compiled kernel
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from sla_dsl.autotune import Shape
from sla_dsl.autotune.protocol import override_config
from sla_dsl.autotune.runner import call_arguments
from sla_dsl.backends.triton import generator
from sla_dsl.backends.triton.runtime import TritonKernels, interpreting
from sla_dsl.codegen import generated_module

KERNELS = ("prep_kernel", "states_kernel", "output_kernel", "bwd_dh_kernel", "bwd_dqk_kernel", "bwd_wy_kernel")


class SM90Driver:
    """What JITFunction.run asks of the active driver before compiling: an sm_90 target, device and stream."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _registers_and_stack(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack bytes per thread) from cuobjdump, which ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else (None, None)


def compile_for_sm90(spec, dim: int = 128, dtype: str = "bfloat16", configs: dict | None = None,
                     override: dict | None = None) -> list[dict]:
    """Compiles every kernel of `spec` that a call at K = V = `dim` in `dtype` launches, for both phases, with
    `configs[phase]` (default: the backend's default config with the settings `override` names, keys of either
    phase); one row per compiled kernel."""
    if interpreting():
        raise RuntimeError("compile_for_sm90: TRITON_INTERPRET=1 in this process; run it in one without")
    driver.set_active(SM90Driver())
    kernels = TritonKernels(spec, generated_module(spec, "triton", generator.filename(spec)))
    shape = Shape(4, 8192, 16, dim, dim, dtype)
    positional, cu_seqlens, scale, do, dfinal = call_arguments(spec, Shape(2, 16, 4, dim, dim, dtype), "cpu")
    rows = []
    for phase in ("fwd", "bwd"):
        config = (configs or {}).get(phase) or override_config(kernels, spec, "triton", shape, phase, override) \
            or kernels.default_config(shape, phase)
        for name in KERNELS:
            getattr(kernels.module, name).device_caches.clear()
        if phase == "fwd":
            kernels.forward(*positional, cu_seqlens, scale, True, config=config, compile_only=True)
        else:
            kernels.backward(*positional, cu_seqlens, scale, do, dfinal, config=config, compile_only=True)
        for name in KERNELS:
            for compiled in getattr(kernels.module, name).device_caches[0][0].values():
                registers, stack = _registers_and_stack(compiled.asm["cubin"])
                rows.append({"kernel": name, "phase": phase, "dim": dim, "dtype": dtype, "config": config,
                             "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
                             "registers": registers, "stack": stack})
    return rows


def main(argv: list[str]) -> int:
    from sla_dsl.autotune.runner import resolve_specs

    if not argv:
        print(__doc__.strip().splitlines()[-1].strip())
        return 2
    spec = resolve_specs([argv[0]])[0]
    dim = int(argv[1]) if len(argv) > 1 else 128
    dtype = argv[2] if len(argv) > 2 else "bfloat16"
    override = json.loads(argv[3]) if len(argv) > 3 else None
    for row in compile_for_sm90(spec, dim, dtype, override=override):
        print(json.dumps(row, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
