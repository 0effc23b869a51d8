"""Compiling the generated TileLang kernels for sm_90a on a machine without a GPU, and reading what each one uses:
registers and spill stores (from ptxas), the size of its machine code (the cubin's .text), shared memory (its
compiled layout), and the resident CTAs per SM these allow. What bounds a chunk-parallel stage's occupancy, to read
next to a profile (scripts/profile_kernels.py). The configs are a GPU's tuned ones for the shape (its table under
autotune/), else the default, with the keys of --config set over them. It also names the row sums
(`T.reduce_sum(..., dim=1)`) whose rows the compiled kernel splits across warps: they meet through shared memory and
a barrier, where a row within a warp takes shuffles alone. A row sum gets that layout from a fragment it shares with
a gemm accumulator (09df650 removed one such sharing; session 21's README).

    python -m sla_dsl.backends.tilelang.offline SPEC[,SPEC...] [BxTxHxK] [--dtype DTYPE] [--gpu GPU] [--config JSON]

CTAs per SM is an estimate from the sm_90 limits below (registers allocated per warp in units of 256, shared memory
per CTA plus 1 KB the driver reserves); a sequential stage's grid (V / block_v x N * H CTAs) is usually smaller than
the GPU, so its occupancy is its grid's, not this figure.

A chunk-parallel stage runs its code once per CTA, top to bottom, with a T.Parallel loop unrolled over every element
a thread takes; code past the SM's instruction cache is fetched again from L2 by each CTA. On the H100 the time of
sla_gla's bwd_chunk grew with its code from 8192 instructions (128 KB) on, at fixed registers and shared memory
(5.05 -> 6.76 ms from 8256 to 9200 instructions; 2026-11-25-session25): the report flags code past that size."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

from tilelang import env as tilelang_env

from sla_dsl.autotune.runner import resolve_specs
from sla_dsl.autotune.shapes import parse_shapes
from sla_dsl.autotune.table import lookup
from sla_dsl.backends import SM90_RESERVED_SHARED_PER_CTA, SM90_SHARED_MEMORY_PER_SM
from sla_dsl.backends.tilelang import SM90_TARGET, TileLangKernels, compile_kernel, tuning

SM90_REGISTERS_PER_SM = 65536
SM90_THREADS_PER_SM = 2048
SM90_CTAS_PER_SM = 32
# where a stage's time started to grow with its code on the H100 (the module's docstring)
SM90_INSTRUCTION_CACHE_BYTES = 128 * 1024
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores")
# a row sum of the generated source, and a compiled AllReduce that goes through a shared workspace
_ROW_SUM = re.compile(r"T\.reduce_sum\(\w+, (\w+), dim=1\)")
_WORKSPACE_ALL_REDUCE = re.compile(r"(\w+)\[[^\]]*\] = tl::AllReduce<[^;]*?::run\([^;]*?\(&")


class CompiledUsage(NamedTuple):
    registers: int  # per thread
    spill_bytes: int  # spill stores
    code_bytes: int  # machine code of the kernel functions (16 bytes per sm_90 instruction)


def compiled_usage(cuda_source: str) -> CompiledUsage:
    """What a compiled kernel's CUDA source uses, from `ptxas -v` and the cubin it writes."""
    with tempfile.TemporaryDirectory() as scratch:
        path, cubin = Path(scratch) / "kernel.cu", Path(scratch) / "kernel.cubin"
        path.write_text(cuda_source)
        found = subprocess.run(
            ["nvcc", "-arch=sm_90a", "-cubin", "-std=c++17", "-O3", "-DENABLE_BF16",
             f"-I{tilelang_env.TILELANG_TEMPLATE_PATH}", f"-I{tilelang_env.CUTLASS_INCLUDE_DIR}",
             "-Xptxas", "-v", "-o", str(cubin), str(path)],
            capture_output=True, text=True)
        registers = _REGISTERS.search(found.stderr)
        if found.returncode != 0 or registers is None:
            raise RuntimeError(f"nvcc failed on the kernel:\n{found.stderr[-2000:]}")
        code = text_section_bytes(cubin.read_bytes())
    return CompiledUsage(int(registers[1]), int(_SPILLS.search(found.stderr)[1]), code)


def text_section_bytes(elf: bytes) -> int:
    """The total size of an ELF64 (little-endian, as nvcc writes cubins) file's `.text.*` sections: one per
    kernel or device function."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    section_table, = struct.unpack_from("<Q", elf, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    # each section header: name, type, flags, addr, offset, size, link, info, addralign, entsize
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, section_table + n * entry_size) for n in range(count)]
    names = headers[names_index][4]

    def name(header) -> str:
        start = names + header[0]
        return elf[start:elf.index(b"\0", start)].decode()

    return sum(header[5] for header in headers if name(header).startswith(".text."))


def cross_warp_row_sums(factory_source: str, cuda_source: str) -> dict[str, int]:
    """The row sums of a kernel factory's source whose compiled AllReduce goes through shared memory (its rows
    split across warps), by destination fragment, with how many such AllReduce calls each has."""
    rows = set(_ROW_SUM.findall(factory_source))
    found: dict[str, int] = {}
    for name in _WORKSPACE_ALL_REDUCE.findall(cuda_source):
        if name in rows:
            found[name] = found.get(name, 0) + 1
    return dict(sorted(found.items()))


def ctas_per_sm(registers: int, threads: int, shared_bytes: int) -> dict[str, int]:
    """Resident CTAs per SM allowed by each sm_90 limit."""
    per_warp = -(-registers * 32 // 256) * 256
    return {"registers": SM90_REGISTERS_PER_SM // (per_warp * (threads // 32)),
            "shared": SM90_SHARED_MEMORY_PER_SM // (shared_bytes + SM90_RESERVED_SHARED_PER_CTA),
            "threads": SM90_THREADS_PER_SM // threads}


def report(spec, shape, gpu: str, overrides: dict | None = None) -> None:
    kernels = TileLangKernels(spec)
    known = {key for phase in ("fwd", "bwd") for key in kernels.default_config(shape, phase)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise SystemExit(f"--config: {', '.join(unknown)} is not a key of {spec.name}'s TileLang configs "
                         f"(expected some of: {', '.join(sorted(known))})")
    for phase in ("fwd", "bwd"):
        tuned = lookup(spec, "tilelang", shape, phase=phase, gpu=gpu)
        config = tuned if tuned is not None else kernels.default_config(shape, phase)
        origin = "tuned" if tuned is not None else "default"
        if overrides:
            config = {**config, **{key: value for key, value in overrides.items() if key in config}}
            origin += " + --config"
        if tuning.SCHEDULE in config:
            origin += f", {config[tuning.SCHEDULE]} schedule"
        for stage in tuning.phase_stages(kernels.module, phase, config):  # the stages this config runs
            params = tuning.kernel_params(config, stage)
            compiled = compile_kernel(kernels.module, tuning.stage_kernel(stage), shape.H, tuning.padded(shape.K),
                                      tuning.padded(shape.V), shape.dtype, params, target=SM90_TARGET)
            source = compiled.get_kernel_source()
            shared = tuning.compiled_shared_memory_bytes(source, kernels.module, stage, config, shape)
            registers, spills, code = compiled_usage(source)
            limits = ctas_per_sm(registers, params["threads"], shared)
            bound = min(limits, key=limits.get)
            occupancy = f", min_blocks {params['min_blocks']}" if "min_blocks" in params else ""
            crossing = cross_warp_row_sums(inspect.getsource(getattr(kernels.module, tuning.stage_kernel(stage))),
                                           source)
            across = ("; row sums across warps: " + ", ".join(f"{name} x{count}" for name, count in crossing.items())
                      if crossing else "")
            over = " (past the instruction cache)" if code > SM90_INSTRUCTION_CACHE_BYTES else ""
            print(f"{spec.name} {phase} {stage} ({origin}: chunk {params['chunk']}, block_v {params['block_v']}, "
                  f"{params['threads']} threads{occupancy}): {registers} registers, {spills} B spilled, "
                  f"{code // 1024} KB of code{over}, {shared} B shared; "
                  f"{min(SM90_CTAS_PER_SM, limits[bound])} CTAs / SM ({bound} bound){across}", flush=True)


def _config_object(text: str) -> dict:
    """--config's value: a JSON object (argparse reports the ValueError as an invalid value)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", help="comma-separated spec names or paths")
    parser.add_argument("shape", nargs="?", default="4x8192x16x128", help="BxTxHxK[xV]")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gpu", default="NVIDIA_H100_80GB_HBM3", help="whose tuned table (autotune/<gpu>/)")
    parser.add_argument("--config", type=_config_object, default=None,
                        help="JSON object of config keys set over the tuned or default ones, each phase taking "
                             "those it has (e.g. a stale table entry's, or a config the sweep has not tried)")
    args = parser.parse_args()
    (shape,) = parse_shapes(args.shape, args.dtype)
    for spec in resolve_specs(args.specs.split(",")):
        report(spec, shape, args.gpu, args.config)


if __name__ == "__main__":
    main()
