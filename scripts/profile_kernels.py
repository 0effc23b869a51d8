"""Per-kernel GPU time of one spec's forward and backward on one backend (torch.profiler), to see which stage
of a schedule to work on. Usage: python scripts/profile_kernels.py SPEC BACKEND [BxTxHxK] [dtype]"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import sla_dsl
from sla_dsl.autotune.runner import resolve_specs
from sla_dsl.autotune.shapes import parse_shapes
from sla_dsl.workloads import realistic_inputs


def main(spec_name: str, backend: str, shape_text: str = "4x8192x16x128", dtype: str = "bfloat16") -> None:
    spec = resolve_specs([spec_name])[0]
    shape = parse_shapes(shape_text, dtype)[0]
    op = sla_dsl.compile(spec, backend)
    inputs = realistic_inputs(spec.recurrence, shape.B, shape.T, shape.H, shape.K, shape.V,
                              dtype=getattr(torch, dtype), device="cuda", requires_grad=True)
    grad = torch.randn(shape.B, shape.T, shape.H, shape.V, device="cuda", dtype=getattr(torch, dtype))
    for _ in range(3):  # compile and warm up
        op(**inputs)[0].backward(grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            op(**inputs)[0].backward(grad)
        torch.cuda.synchronize()
    print(f"{spec.name} {backend} {shape_text} {dtype}: CUDA time per forward+backward (mean of 5)")
    for event in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]:
        print(f"  {event.device_time_total / 5 / 1e3:8.3f} ms  {event.count // 5:3d}x  {event.key[:90]}")


if __name__ == "__main__":
    main(*sys.argv[1:])
