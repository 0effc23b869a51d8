"""Per-kernel GPU time of specs' forward and backward (torch.profiler), to see which stage of a schedule to work on.
Backends: triton, tilelang, or fla (fla's op doing the same work, as the bench runs it). TileLang kernels are named
<spec>_<stage>_kernel.
Usage: python scripts/profile_kernels.py SPEC[,SPEC...] BACKEND[,BACKEND...] [BxTxHxK] [dtype]"""

from __future__ import annotations

import sys

import torch

import sla_dsl
from sla_dsl.autotune.precompile import compile_ahead
from sla_dsl.autotune.runner import resolve_specs
from sla_dsl.autotune.shapes import parse_shapes
from sla_dsl.kernel_profile import format_rows, kernel_times
from sla_dsl.workloads import fla_equivalent, realistic_inputs

REPEATS = 5


def _forward(spec, backend: str, heads: int):
    if backend == "fla":
        found = fla_equivalent(spec.recurrence, heads)
        if found is None:
            raise SystemExit(f"fla has no op for {spec.name}")
        return found[1]
    op = sla_dsl.compile(spec, backend)
    return lambda **inputs: op(**inputs)[0]


def profile_one(spec, backend: str, shape, dtype: torch.dtype) -> None:
    forward = _forward(spec, backend, shape.H)
    inputs = realistic_inputs(spec.recurrence, shape.B, shape.T, shape.H, shape.K, shape.V,
                              dtype=dtype, device="cuda", requires_grad=True)
    grad = torch.randn(shape.B, shape.T, shape.H, shape.V, device="cuda", dtype=dtype)

    def step():
        forward(**inputs).backward(grad)
        for leaf in inputs.values():  # no accumulation kernels in the profile
            leaf.grad = None

    for _ in range(2):  # compile, autotune (fla) and warm up; kernel_times adds one more
        step()
    rows = kernel_times(step, REPEATS)
    # a line of its own: progress bars before it end in a carriage return, not a newline
    print(f"\n{spec.name} {backend} {shape.B}x{shape.T}x{shape.H}x{shape.K} {dtype}: "
          f"CUDA time per forward+backward (mean of {REPEATS}), kernels sum {sum(r.ms for r in rows):.3f} ms")
    print(format_rows(rows, 14))


def main(specs: str, backends: str, shape_text: str = "4x8192x16x128", dtype: str = "bfloat16") -> None:
    shape = parse_shapes(shape_text, dtype)[0]
    specs, backends = resolve_specs(specs.split(",")), backends.split(",")
    # TileLang compiles take up to half a minute each: all of them first, in parallel workers
    for line in compile_ahead([(backend, spec, shape, phase) for spec in specs for backend in backends
                               if backend != "fla" for phase in ("fwd", "bwd")]):
        print(f"compile ahead failed: {line}", file=sys.stderr)
    for spec in specs:
        for backend in backends:
            profile_one(spec, backend, shape, getattr(torch, dtype))


if __name__ == "__main__":
    main(*sys.argv[1:])
