"""`python -m sla_dsl gpu-check`: the shared correctness suite at real sizes on the GPU, for each GPU backend.

Every case runs forward and backward with NaN-poisoned outputs and compares outputs and all gradients with
the float64 reference (computed on the GPU) by relative error, with the same tolerances as the CPU suite
(`sla_dsl.testing.TOLERANCES`). Cases: the six seed specs in fp32/fp16/bf16 at a real size, every
decay x write rule x gates combination in bf16 with T not a multiple of the chunk, packed variable lengths
with an initial state, head dims from 16 to 256 (non-powers of two where the backend takes them), and
T = 65536 with strong decay (no inf or NaN, still within tolerance).

Writes `<out>/gpu-check-<backend>.json` (one row per case) and `<out>/gpu-check.log` after every case (a run
cut short leaves what it did), prints one line per case, and exits 1 if any case fails or errors.
`--shard K/N` runs every N-th case from the K-th (and compiles only their kernels), so the whole suite can be
split over calls shorter than its compile time; its files are named `...-shardKofN`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from sla_dsl import testing
from sla_dsl.codegen import seed_specs
from sla_dsl.spec import Decay, Gates, WriteRule

SEED_SHAPE = dict(batch=2, length=4096, heads=4, dim_k=128, dim_v=128)
COMBINATION_SHAPE = dict(batch=2, length=1000, heads=4, dim_k=64, dim_v=64)
VARLEN_BOUNDS = (0, 7, 1000, 1001, 2600, 4000)
LONG_SHAPE = dict(batch=1, length=65536, heads=2, dim_k=64, dim_v=64)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# K = V head dims per backend, powers of two and not (both backends pad to a power of two).
HEAD_DIMS = {"triton": (16, 32, 60, 64, 100, 128, 256), "tilelang": (16, 32, 48, 60, 100, 128, 256)}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    recurrence: object
    shape: dict
    dtype: torch.dtype
    cu_seqlens: tuple | None = None
    decay_strength: float = 1.0
    reference_chunk_size: int = 16


def cases(backend: str, quick: bool, specs: list[str] | None = None) -> list[Case]:
    """The suite; `specs`: only these seed specs' cases (by name), the cases of other recurrences as before."""
    out = []
    for spec in seed_specs():
        if specs is not None and spec.name not in specs:
            continue
        for label, dtype in DTYPES.items():
            out.append(Case(f"{spec.name} {label} {_shape_text(SEED_SHAPE)}", spec.recurrence, SEED_SHAPE, dtype,
                            reference_chunk_size=64))
    if quick:
        return out
    for rec in testing.all_combinations():
        out.append(Case(f"{testing.combination_id(rec)} bf16 {_shape_text(COMBINATION_SHAPE)}", rec,
                        COMBINATION_SHAPE, torch.bfloat16))
    for decay in (Decay.CONSTANT, Decay.SCALAR, Decay.VECTOR):
        for write in WriteRule:
            rec = testing.recurrence(decay, write, Gates.BOTH)
            shape = dict(batch=1, length=VARLEN_BOUNDS[-1], heads=4, dim_k=128, dim_v=128)
            out.append(Case(f"{testing.combination_id(rec)} bf16 varlen {VARLEN_BOUNDS}", rec, shape,
                            torch.bfloat16, cu_seqlens=VARLEN_BOUNDS, reference_chunk_size=64))
    for dim in HEAD_DIMS[backend]:
        for write in WriteRule:
            rec = testing.recurrence(Decay.VECTOR if write is WriteRule.ADDITIVE else Decay.SCALAR, write, Gates.BOTH)
            shape = dict(batch=2, length=1024, heads=4, dim_k=dim, dim_v=dim)
            out.append(Case(f"{testing.combination_id(rec)} bf16 K=V={dim}", rec, shape, torch.bfloat16))
    for decay in (Decay.SCALAR, Decay.VECTOR):
        for write in WriteRule:
            rec = testing.recurrence(decay, write, Gates.BOTH)
            out.append(Case(f"{testing.combination_id(rec)} bf16 T=65536 strong decay", rec, LONG_SHAPE,
                            torch.bfloat16, decay_strength=8.0, reference_chunk_size=256))
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 1 <= K <= N (the argparse type of --shard)."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 2/3, got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"expected 1 <= K <= N, got {text!r}")
    return k, n


def shard(case_list: list[Case], k: int, n: int) -> list[Case]:
    """Every n-th case from the k-th (1-based): each shard gets a mix of the suite's kinds of case."""
    return case_list[k - 1::n]


def _shape_text(shape: dict) -> str:
    return "B{batch} T{length} H{heads} K{dim_k} V{dim_v}".format(**shape)


def case_spec(case: Case):
    """A seed spec with this case's recurrence: generated on demand into the user cache like any new spec."""
    return dataclasses.replace(seed_specs()[0], recurrence=case.recurrence,
                               name="gpu_check_" + testing.combination_id(case.recurrence).replace("-", "_"))


def compile_jobs(backend: str, case_list: list[Case]) -> list[tuple]:
    """(backend, spec, shape, phase) of every kernel the cases run, for compile_ahead."""
    from sla_dsl.autotune import Shape

    jobs = []
    for case in case_list:
        s = case.shape
        batch = len(case.cu_seqlens) - 1 if case.cu_seqlens else s["batch"]
        shape = Shape(batch, max(1, s["length"] // batch), s["heads"], s["dim_k"], s["dim_v"], case.dtype,
                      case.cu_seqlens is not None)
        jobs += [(backend, case_spec(case), shape, phase) for phase in ("fwd", "bwd")]
    return jobs


def run_case(backend: str, kernels_cache: dict, case: Case) -> dict:
    from sla_dsl.backends import build_backend

    key = case.recurrence
    if key not in kernels_cache:
        kernels_cache[key] = build_backend(backend, case_spec(case))
    num_sequences = len(case.cu_seqlens) - 1 if case.cu_seqlens else None
    inputs = testing.make_inputs(case.recurrence, **case.shape, dtype=case.dtype, device="cuda", seed=7,
                                 num_sequences=num_sequences, decay_strength=case.decay_strength)
    cu = torch.tensor(case.cu_seqlens, device="cuda") if case.cu_seqlens else None
    start = time.perf_counter()
    errors = testing.compare_to_reference(case.recurrence, kernels_cache[key], inputs, cu_seqlens=cu,
                                          reference_chunk_size=case.reference_chunk_size)
    out_tol, grad_tol = testing.TOLERANCES[case.dtype]
    failed = {n: e for n, e in errors.items() if not e <= (out_tol if n in ("o", "final_state") else grad_tol)}
    return {"case": case.name, "backend": backend, "ok": not failed, "errors": errors,
            "tolerance": {"outputs": out_tol, "gradients": grad_tol}, "seconds": round(time.perf_counter() - start, 2)}


def run_gpu_check(args) -> int:
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU; on CPU the same suite runs as `bash scripts/test.sh`")
        return 1
    k, n = args.shard or (1, 1)
    suffix = f"-shard{k}of{n}" if args.shard else ""
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out) if args.out else Path("benchmarks") / gpu
    out.mkdir(parents=True, exist_ok=True)
    log_lines = [f"# sla-dsl gpu-check on {torch.cuda.get_device_name()}, {datetime.date.today().isoformat()}",
                 f"# command: python -m sla_dsl gpu-check {shlex.join(sys.argv[2:])}",
                 f"# torch {torch.__version__}, python {platform.python_version()}, {_versions()}"]
    print("\n".join(log_lines), flush=True)
    failures = 0
    from sla_dsl.autotune.precompile import compile_ahead

    for backend in args.backends:
        rows, kernels_cache = [], {}
        case_list = shard(cases(backend, args.quick, args.specs), k, n)
        for line in compile_ahead(compile_jobs(backend, case_list)):
            print(f"# compile ahead failed: {line}", flush=True)
        if args.compile_only:
            print(f"# {backend}: compiled the kernels of {len(case_list)} cases", flush=True)
            continue
        for case in case_list:
            try:
                row = run_case(backend, kernels_cache, case)
            except Exception as exc:  # noqa: BLE001 -- one failing case must not hide the others
                row = {"case": case.name, "backend": backend, "ok": False,
                       "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            rows.append(row)
            failures += not row["ok"]
            line = _line(row)
            log_lines.append(line)
            print(line, flush=True)
            (out / f"gpu-check-{backend}{suffix}.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
            (out / f"gpu-check{suffix}.log").write_text("\n".join(log_lines) + "\n")
        passed = sum(r["ok"] for r in rows)
        summary = f"# {backend}: {passed}/{len(rows)} cases passed"
        log_lines.append(summary)
        print(summary, flush=True)
    if not args.compile_only:
        (out / f"gpu-check{suffix}.log").write_text("\n".join(log_lines) + "\n")
    return 1 if failures else 0


def _line(row: dict) -> str:
    status = "ok  " if row["ok"] else "FAIL"
    if "error" in row:
        return f"{status} {row['backend']:<9} {row['case']}: {row['error'].splitlines()[0][:200]}"
    worst = max(row["errors"], key=row["errors"].get)
    detail = " ".join(f"{n}={e:.1e}" for n, e in row["errors"].items())
    return f"{status} {row['backend']:<9} {row['case']}: worst {worst} {row['errors'][worst]:.1e} ({detail}) " \
           f"{row['seconds']}s"


def _versions() -> str:
    import importlib.metadata as md

    found = []
    for name in ("triton", "tilelang"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def add_arguments(parser) -> None:
    parser.add_argument("--backends", nargs="+", default=["triton", "tilelang"], choices=["triton", "tilelang"])
    parser.add_argument("--quick", action="store_true", help="only the seed specs at the real size")
    parser.add_argument("--specs", nargs="+", default=None, metavar="NAME", choices=[s.name for s in seed_specs()],
                        help="only these seed specs' cases (with --quick: nothing else)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile every kernel the cases run (into the disk caches) and stop")
    parser.add_argument("--shard", default=None, type=parse_shard, metavar="K/N",
                        help="only every N-th case from the K-th, e.g. 1/3 (the suite split over several runs)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/<gpu>/)")
