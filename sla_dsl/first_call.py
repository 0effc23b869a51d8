"""`python -m sla_dsl first-call`: how long the very first forward+backward takes in a fresh process.

Ours (with the shipped tuned table: compilation only, no tuning at call time) and fla's matching op (which
autotunes on its first call) each run in their own fresh subprocess at the reference shape. By default each
child gets empty Triton/TileLang/sla_dsl caches (a true first call); `--warm-cache` keeps the usual ones.
Results are printed and merged into `benchmarks/<gpu>/first_call.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "FIRST_CALL_RESULT "


def _child(args) -> int:
    started = time.perf_counter()
    import torch

    from sla_dsl.autotune.runner import TORCH_DTYPES, resolve_specs
    from sla_dsl.autotune.shapes import parse_shape

    spec = resolve_specs([args.spec])[0]
    shape = parse_shape(args.shape, args.dtype)
    record = {"spec": spec.name, "who": args.child, "backend": args.backend if args.child == "ours" else "fla",
              "B": shape.B, "T": shape.T, "H": shape.H, "K": shape.K, "V": shape.V, "dtype": shape.dtype}
    try:
        from sla_dsl.workloads import fla_equivalent, realistic_inputs

        if args.child == "ours":
            import sla_dsl
            from sla_dsl.autotune.table import describe

            op = sla_dsl.compile(spec, args.backend)
            fn = lambda a: op(**a)[0]  # noqa: E731
            record["tuning"] = describe(spec, args.backend)
        else:
            found = fla_equivalent(spec.recurrence, shape.H)
            if found is None:
                raise RuntimeError("fla has no op for this recurrence")
            record["op"], fla_fn, record["note"] = found
            fn = lambda a: fla_fn(**a)  # noqa: E731
        torch.cuda.init()
        record["import_s"] = round(time.perf_counter() - started, 3)
        dtype = TORCH_DTYPES[shape.dtype]
        inputs = realistic_inputs(spec.recurrence, shape.B, shape.T, shape.H, shape.K, shape.V, dtype=dtype,
                                  requires_grad=True)
        grad = torch.randn(shape.B, shape.T, shape.H, shape.V, device="cuda", dtype=dtype)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        o = fn(inputs)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        o.backward(grad)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        record.update(first_fwd_s=round(t1 - t0, 3), first_bwd_s=round(t2 - t1, 3),
                      first_fwdbwd_s=round(t2 - t0, 3))
        import triton.testing

        def step():
            fn(inputs).backward(grad)
        record["steady_fwdbwd_ms"] = round(float(triton.testing.do_bench(
            step, warmup=25, rep=100, grad_to_none=list(inputs.values()), return_mode="median")), 4)
    except Exception as exc:  # noqa: BLE001 -- reported to the parent as a record
        record["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
    record["process_s"] = round(time.perf_counter() - started, 3)
    print(MARKER + json.dumps(record, sort_keys=True), flush=True)
    return 0 if "error" not in record else 1


def _spawn(args, who: str, cache_root: Path | None) -> dict:
    command = [sys.executable, "-m", "sla_dsl", "first-call", "--child", who, "--spec", args.spec,
               "--backend", args.backend, "--shape", args.shape, "--dtype", args.dtype]
    env = dict(os.environ)
    env.setdefault("FLA_CACHE_RESULTS", "1")
    if cache_root is not None:
        for var, sub in (("TRITON_CACHE_DIR", "triton"), ("TILELANG_CACHE_DIR", "tilelang"),
                         ("SLA_DSL_CACHE", "sla_dsl"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
            env[var] = str(cache_root / who / sub)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"who": who, "error": f"timed out after {args.timeout} s"}
    wall = round(time.perf_counter() - started, 3)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARKER):
            record = json.loads(line[len(MARKER):])
            record["subprocess_wall_s"] = wall
            return record
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    return {"who": who, "error": f"child exited {done.returncode} without a result: " + " | ".join(tail)}


def run_first_call(args) -> int:
    if args.child:
        return _child(args)
    import torch

    if not torch.cuda.is_available():
        print("first-call needs a CUDA GPU (torch.cuda.is_available() is False); run it on the GPU machine.")
        return 2
    from sla_dsl.autotune.table import gpu_name, utc_now, versions, write_atomically

    gpu = gpu_name()
    out = Path(args.out) if args.out else Path("benchmarks") / gpu
    temporary = None if args.warm_cache else tempfile.TemporaryDirectory(prefix="sla_dsl_first_call_")
    cache_root = None if temporary is None else Path(temporary.name)
    records = []
    try:
        for who in ("ours",) + (() if args.no_fla else ("fla",)):
            record = _spawn(args, who, cache_root)
            record.update(cache="warm" if args.warm_cache else "cold", date=utc_now(), gpu=gpu)
            records.append(record)
            print(_describe(record), flush=True)
    finally:
        if temporary is not None:
            temporary.cleanup()
    path = out / "first_call.json"
    try:
        existing = json.loads(path.read_text())
        existing = existing if isinstance(existing, list) else []
    except (OSError, ValueError):
        existing = []
    key = lambda r: (r.get("spec"), r.get("who"), r.get("backend"), r.get("B"), r.get("T"), r.get("H"),  # noqa: E731
                     r.get("K"), r.get("V"), r.get("dtype"), r.get("cache"))
    new_keys = {key(r) for r in records}
    merged = [r for r in existing if isinstance(r, dict) and key(r) not in new_keys] + records
    for r in records:
        r["versions"] = versions()
    write_atomically(path, json.dumps(merged, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in records) else 1


def _describe(r: dict) -> str:
    who = f"{r.get('who')}{'/' + r['backend'] if r.get('who') == 'ours' else ''}"
    if "error" in r:
        return f"{who}: ERROR {r['error']}"
    return (f"{who} {r.get('spec')} {r.get('B')}x{r.get('T')}x{r.get('H')}x{r.get('K')} ({r.get('cache')} cache): "
            f"first fwd+bwd {r['first_fwdbwd_s']:.2f} s (fwd {r['first_fwd_s']:.2f} s, bwd {r['first_bwd_s']:.2f} s), "
            f"imports {r.get('import_s')} s, steady fwd+bwd {r.get('steady_fwdbwd_ms')} ms"
            + (f", {r['tuning']}" if r.get("tuning") else "") + (f", fla op {r['op']}" if r.get("op") else ""))


def add_arguments(parser) -> None:
    parser.add_argument("--spec", required=True, metavar="PATH|NAME")
    parser.add_argument("--backend", default="triton", choices=("triton", "tilelang"))
    parser.add_argument("--shape", default="4x8192x16x128", metavar="BxTxHxK[xV]")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep the usual Triton/TileLang caches (default: each child starts with empty ones)")
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--timeout", type=float, default=540.0, help="per child process (default 540 s)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/<gpu>/)")
    parser.add_argument("--child", choices=("ours", "fla"), default=None, help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS
