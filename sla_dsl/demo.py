"""`python -m sla_dsl demo`: load the seed specs, generate their kernels, run forward and backward on a small
workload (on the GPU if there is one, else on the CPU: Triton's interpreter and TileLang's C target) and report
speed and error against the float64 reference."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from sla_dsl.codegen import SEED_SPECS_DIR

# Small enough for Triton's interpreter on two CPU cores, big enough to span several chunks and sub-blocks.
CPU_SHAPE = dict(batch=1, length=80, heads=2, dim_k=32, dim_v=32)
GPU_SHAPE = dict(batch=2, length=2048, heads=8, dim_k=128, dim_v=128)


def _available_backends(on_gpu: bool) -> list[str]:
    return ["triton", "tilelang"] if on_gpu else ["reference", "triton", "tilelang"]


def _time_ms(fn, on_gpu: bool) -> float:
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if on_gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def run_demo(args) -> int:
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any backend imports triton
    from sla_dsl.backends import build_backend
    from sla_dsl.loader import SpecError, load_spec
    from sla_dsl.testing import TOLERANCES, compare_to_reference, make_inputs

    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    paths = [Path(p) for p in args.specs] if args.specs else sorted(SEED_SPECS_DIR.glob("*.yaml"))
    where = torch.cuda.get_device_name() if on_gpu else "CPU (Triton interpreter, TileLang C target)"
    print(f"sla-dsl demo on {where}: B={shape['batch']} T={shape['length']} H={shape['heads']} "
          f"K={shape['dim_k']} V={shape['dim_v']} {str(dtype).removeprefix('torch.')}")
    header = f"{'spec':<12} {'backend':<10} {'build s':>8} {'fwd+bwd ms':>11} {'err out':>9} {'err grad':>9}  status"
    print(header)
    print("-" * len(header))
    failures = 0
    out_tol, grad_tol = TOLERANCES[dtype]
    for path in paths:
        try:
            spec = load_spec(path)
        except SpecError as exc:
            print(exc)
            failures += 1
            continue
        for backend in _available_backends(on_gpu):
            start = time.perf_counter()
            try:
                kernels = build_backend(backend, spec)
                build_s = time.perf_counter() - start
                inputs = make_inputs(spec.recurrence, **shape, dtype=dtype, device=device, seed=0)
                errors: dict[str, float] = {}
                elapsed = _time_ms(lambda: errors.update(compare_to_reference(spec.recurrence, kernels, inputs)),
                                   on_gpu)
            except Exception as exc:  # noqa: BLE001 -- one backend failing must not hide the others' results
                failures += 1
                print(f"{spec.name:<12} {backend:<10} {'':>8} {'':>11} {'':>9} {'':>9}  FAILED: "
                      f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160])
                continue
            out_err = max(errors[n] for n in ("o", "final_state"))
            grad_err = max(e for n, e in errors.items() if n not in ("o", "final_state"))
            ok = out_err <= out_tol and grad_err <= grad_tol
            failures += not ok
            print(f"{spec.name:<12} {backend:<10} {build_s:>8.2f} {elapsed:>11.1f} {out_err:>9.1e} {grad_err:>9.1e}"
                  f"  {'ok' if ok else 'FAILED'}")
    print("(fwd+bwd ms includes the float64 reference run used for the error columns; `python -m sla_dsl bench` "
          "times kernels alone)")
    return 1 if failures else 0
