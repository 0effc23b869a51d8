"""Every generated TileLang kernel of the six seed specs lowers and compiles for sm_90a (nvcc, no GPU needed).

Compiled binaries go to TileLang's cache under the sla_dsl cache directory (keyed by the kernel's full TIR),
so repeated runs are fast. Compile times are printed and recorded in <cache>/tilelang_compile_times.json.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from sla_dsl.codegen import cache_dir, seed_specs

pytest.importorskip("tilelang")

SPECS = seed_specs()
HEADS, DIM_K, DIM_V = 4, 128, 128
TIMES: dict[str, float] = {}


def _variants():
    # (kernel, extra factory arguments): fwd without and with the stored states the backward uses
    return [("fwd", {"store_states": False}), ("fwd", {"store_states": True}), ("bwd_dh", {}), ("bwd_chunk", {})]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_tilelang_kernels_compile_for_sm90a(spec):
    from sla_dsl.backends.tilelang import SM90_TARGET, TileLangKernels, compile_kernel

    kernels = TileLangKernels(spec)
    total = 0.0
    for name, extra in _variants():
        config = kernels.kernel_config(name, DIM_K, DIM_V)
        start = time.perf_counter()
        compiled = compile_kernel(kernels.module, name, HEADS, DIM_K, DIM_V, "bfloat16", config, target=SM90_TARGET,
                                  **extra)
        elapsed = time.perf_counter() - start
        total += elapsed
        source = compiled.get_kernel_source()
        assert "__global__" in source
        label = f"{spec.name}.{name}" + ("+states" if extra.get("store_states") else "")
        TIMES[label] = elapsed
        print(f"compiled {label} ({config}) in {elapsed:.1f} s")
    TIMES[f"{spec.name}.total"] = total
    print(f"{spec.name}: all TileLang kernels compiled in {total:.1f} s")
    record = cache_dir() / "tilelang_compile_times.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(record.read_text()) if record.exists() else {}
    previous.update(TIMES)
    record.write_text(json.dumps(previous, indent=1, sort_keys=True))
