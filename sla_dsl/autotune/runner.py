"""`python -m sla_dsl autotune`: GPU timing and the reference check of winners (in a worker process, see
`isolate`), and table writing."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from pathlib import Path

import torch

from sla_dsl.autotune.isolate import DEFAULT_TIMEOUT_S, IsolatedDevice
from sla_dsl.autotune.precompile import Precompiler
from sla_dsl.autotune.protocol import config_label, default_config, is_tunable, tuning_space
from sla_dsl.autotune.shapes import Shape, distance, parse_shapes
from sla_dsl.autotune.sweep import SweepStopped, Task, stderr_log, sweep
from sla_dsl.autotune.table import (forced_gpu, gpu_name, phase_source_hashes, readable_table, source_hash, table_path,
                                    table_root, update_table, valid_phases)

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "float64": torch.float64}
ARG_NAMES = ("q", "k", "v", "g", "beta", "gq", "gk")


class Configured:
    """A kernels object whose forward/backward run with fixed configs (None: the kernels' own choice)."""

    def __init__(self, kernels, fwd: dict | None = None, bwd: dict | None = None):
        self.kernels, self.fwd, self.bwd = kernels, fwd, bwd

    def forward(self, *args):
        return self.kernels.forward(*args, config=self.fwd)

    def backward(self, *args):
        return self.kernels.backward(*args, config=self.bwd)


def varlen_bounds(batch: int, length: int) -> list[int]:
    """`batch` sequences of mean length `length`, unequal (alternately shorter and longer), packed."""
    lengths = [max(1, length + (length // 4 if i % 2 else -(length // 4))) for i in range(batch)]
    if batch % 2:
        lengths[-1] = length
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return bounds


def call_arguments(spec, shape: Shape, device, seed: int = 0):
    """(forward's positional arguments q .. initial_state, cu_seqlens, scale, do, dfinal_state) for a call of
    `shape`: realistic inputs (sla_dsl.workloads: q, k, v, beta and gates in the shape's dtype, decays in
    float32), an initial state, and the final state's gradient. The timings, the ahead-of-time compiles
    and the reference check (verify_config) all pass these dtypes and optional tensors, so they run the
    same kernel specialisations."""
    from sla_dsl.workloads import realistic_inputs

    rec = spec.recurrence
    dtype = TORCH_DTYPES[shape.dtype]
    if shape.varlen:
        bounds = varlen_bounds(shape.B, shape.T)
        args = realistic_inputs(rec, 1, bounds[-1], shape.H, shape.K, shape.V, dtype=dtype, device=device, seed=seed)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        out_shape = (1, bounds[-1], shape.H, shape.V)
    else:
        args = realistic_inputs(rec, shape.B, shape.T, shape.H, shape.K, shape.V, dtype=dtype, device=device,
                                seed=seed)
        cu_seqlens, out_shape = None, (shape.B, shape.T, shape.H, shape.V)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    rand = lambda *size: torch.randn(*size, generator=gen, device=device, dtype=torch.float32)  # noqa: E731
    state_shape = (shape.B, shape.H, shape.K, shape.V)
    positional = [args.get(name) for name in ARG_NAMES] + [0.1 * rand(*state_shape)]
    do, dfinal_state = rand(*out_shape).to(dtype), rand(*state_shape)
    return positional, cu_seqlens, rec.resolved_scale(shape.K), do, dfinal_state


class GpuMeasure:
    """measure(task, config, precise) -> median ms of the task's phase with `config`, on `call_arguments` of
    the task's shape (cached for consecutive tasks of one spec and shape). The first run (compilation, or
    loading what a compile worker left in the disk cache) happens before timing."""

    def __init__(self, device="cuda", quick_ms=(10, 40), precise_ms=(25, 150)):
        self.device, self.quick_ms, self.precise_ms = device, quick_ms, precise_ms
        self._key, self._args = None, None

    def _inputs(self, task: Task):
        key = (task.spec.name, task.spec.source_sha256, task.shape)
        if key != self._key:
            self._args = None
            if self.device == "cuda":
                torch.cuda.empty_cache()
            self._args, self._key = call_arguments(task.spec, task.shape, self.device), key
        return self._args

    def __call__(self, task: Task, config: dict, precise: bool = False) -> float:
        import triton.testing

        positional, cu_seqlens, scale, do, dfinal_state = self._inputs(task)
        kernels = task.kernels
        if task.phase == "fwd":
            fn = lambda: kernels.forward(*positional, cu_seqlens, scale, True, config=config)  # noqa: E731
        else:
            fn = lambda: kernels.backward(*positional, cu_seqlens, scale, do, dfinal_state,  # noqa: E731
                                          config=config)
        fn()
        if self.device != "cuda":  # CPU smoke runs of the driver: a plain median of three runs
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return sorted(times)[1]
        torch.cuda.synchronize()
        warmup, rep = self.precise_ms if precise else self.quick_ms
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


# T of the reference check: not a multiple of any chunk size up to 64, and several chunks of each
VERIFY_LENGTH = 2 * 64 + 37


def verify_arguments(spec, shape: Shape, device, seed: int = 7):
    """(inputs, cu_seqlens) of the reference check: T = VERIFY_LENGTH (two sequences of it for varlen, after a
    short one), the shape's H, K, V, dtype and layout, an initial state, and call_arguments' dtypes."""
    from sla_dsl.testing import make_inputs

    rec = spec.recurrence
    dtype = TORCH_DTYPES[shape.dtype]
    if shape.varlen:
        bounds = [0, 35, VERIFY_LENGTH, 2 * VERIFY_LENGTH]
        inputs = make_inputs(rec, 1, bounds[-1], shape.H, shape.K, shape.V, dtype=dtype, device=device, seed=seed,
                             num_sequences=len(bounds) - 1)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    else:
        inputs = make_inputs(rec, 2, VERIFY_LENGTH, shape.H, shape.K, shape.V, dtype=dtype, device=device,
                             seed=seed)
        cu_seqlens = None
    if "g" in inputs:
        inputs["g"] = inputs["g"].float()
    return inputs, cu_seqlens


def verify_config(task: Task, config: dict, *, device="cuda", tolerance_scale: float = 1.0) -> tuple[bool, dict]:
    """Runs `config` for the task's phase against the float64 reference on verify_arguments (final state out),
    so it checks the kernels that were timed, and compares with the tolerances of sla_dsl.testing."""
    from sla_dsl.testing import TOLERANCES, compare_to_reference

    inputs, cu_seqlens = verify_arguments(task.spec, task.shape, device)
    wrapped = Configured(task.kernels, fwd=config if task.phase == "fwd" else None,
                         bwd=config if task.phase == "bwd" else None)
    errors = compare_to_reference(task.spec.recurrence, wrapped, inputs, cu_seqlens=cu_seqlens,
                                  backward=task.phase == "bwd")
    tol_out, tol_grad = (tolerance_scale * t for t in TOLERANCES[TORCH_DTYPES[task.shape.dtype]])
    ok = all(err <= (tol_out if name in ("o", "final_state") else tol_grad) for name, err in errors.items())
    return ok, {name: float(f"{err:.3g}") for name, err in errors.items()}


class DeviceWork:
    """What the sweep's worker process runs (`isolate.IsolatedDevice`): builds a backend's kernels, times
    configs with a GpuMeasure (its inputs cached between requests) and runs verify_config. Sent to the
    worker by pickling, before it has run anything."""

    def __init__(self, device: str = "cuda", tolerance_scale: float = 1.0):
        self.device, self.tolerance_scale = device, tolerance_scale
        self.gpu_measure = GpuMeasure(device)

    def build(self, backend: str, spec):
        from sla_dsl.backends import build_backend

        return build_backend(backend, spec)

    def measure(self, task: Task, config: dict, precise: bool) -> float:
        return self.gpu_measure(task, config, precise=precise)

    def verify(self, task: Task, config: dict) -> tuple[bool, dict]:
        return verify_config(task, config, device=self.device, tolerance_scale=self.tolerance_scale)

    def check(self) -> None:
        """Raises if the device is unusable (a CUDA error that poisoned the context surfaces here)."""
        if self.device == "cuda":
            torch.cuda.synchronize()


def default_jobs() -> int:
    """Compile workers: every core but two (the timing process and the system), at most 16."""
    return max(1, min(16, (os.cpu_count() or 1) - 2))


def resolve_specs(names: list[str] | None):
    """Spec paths or seed names ('gla' -> specs/gla.yaml); default: every seed spec."""
    from sla_dsl.codegen import SEED_SPECS_DIR
    from sla_dsl.loader import load_spec

    if not names:
        return [load_spec(p) for p in sorted(SEED_SPECS_DIR.glob("*.yaml"))]
    specs = []
    for name in names:
        for part in name.split(","):
            part = part.strip()
            if not part:
                continue
            path = Path(part)
            if not path.exists() and (SEED_SPECS_DIR / f"{part}.yaml").exists():
                path = SEED_SPECS_DIR / f"{part}.yaml"
            specs.append(load_spec(path))
    return specs


def build_tasks(specs, backends, shapes, phases=("fwd", "bwd"), log=stderr_log):
    """Tasks for every tunable (spec, backend), and the problems with the others."""
    from sla_dsl.backends import build_backend

    tasks, problems = [], []
    for spec in specs:
        for backend in backends:
            try:
                kernels = build_backend(backend, spec)
            except Exception as exc:  # noqa: BLE001 -- one backend failing never stops the others
                problems.append(f"{spec.name}/{backend}: cannot build ({type(exc).__name__}: {exc})")
                continue
            if not is_tunable(kernels):
                problems.append(f"{spec.name}/{backend}: kernels have no tuning_space/default_config "
                                f"(the tuning protocol is not implemented)")
                continue
            try:
                source_hash(spec, backend)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{spec.name}/{backend}: cannot hash the generated source ({exc})")
                continue
            tasks.extend(Task(kernels, spec, backend, shape, phase) for shape in shapes for phase in phases)
    for line in problems:
        log(f"skipping {line}")
    return tasks, problems


def table_seeds(task: Task, root: Path, gpu: str) -> tuple[dict, ...]:
    """The configs the GPU's table holds for the task's spec, backend and phase: its warm start. The task's own
    bucket first (a re-run never starts behind the table), then the other buckets, those with the task's K, V
    and dtype first, nearest first. Winners tuned for other generated kernels (a stale table, or the
    superseded entries update_table keeps) seed it too, each after the current one of its bucket: re-tuning
    after a template change starts from the previous winners. Last, the winners of the task's bucket in the
    GPU's other tables of the backend: another spec's config is a member of this task's space only where its
    kernels have the same stages (an SLA variant and its backbone), so those seed a spec never tuned here, or
    tuned with a smaller budget, from its sibling's winner. Each seed is timed
    and its winner checked against the reference like any config, and the sweep keeps only those in the task's
    space. Nothing from a table that cannot be read (the sweep then starts from the default alone)."""
    own = table_path(gpu, task.backend, task.spec.name, root)
    here = task.shape.bucket()
    seeds = []

    def add(config):
        if config not in seeds:
            seeds.append(config)

    data = readable_table(own)
    if data is not None:
        stored = []
        for older, entries in enumerate((data["entries"], data.get("superseded_entries", {}))):
            for key, entry in entries.items():
                if task.phase in entry:
                    apart = 0.0 if key == here.key else distance(here, Shape.from_key(key))
                    stored.append((apart is None, apart or 0.0, key != here.key, key, older,
                                   entry[task.phase]["config"]))
        for *_, config in sorted(stored, key=lambda item: item[:5]):
            add(config)
    for path in sorted(own.parent.glob("*.json")):
        sibling = readable_table(path) if path != own else None
        if sibling is not None and task.phase in sibling["entries"].get(here.key, {}):
            add(sibling["entries"][here.key][task.phase]["config"])
    return tuple(seeds)


def stale_tasks(tasks: list[Task], root: Path, gpu: str) -> list[Task]:
    """The tasks whose bucket and phase the GPU's table lacks, or holds for other generated kernels (`--only-stale`:
    what a template change left to re-tune); says how many it leaves out."""
    stale = []
    for task in tasks:
        data = readable_table(table_path(gpu, task.backend, task.spec.name, root))
        if not (data is not None and task.phase in valid_phases(data, task.spec, task.backend)
                and task.phase in data["entries"].get(task.shape.bucket().key, {})):
            stale.append(task)
    print(f"{len(tasks) - len(stale)} task(s) tuned for the kernels generated now in {root / gpu}, left out")
    return stale


@contextlib.contextmanager
def sigterm_stops_the_sweep():
    """While active, SIGTERM (what `timeout` sends) raises SweepStopped in the sweep: the task under way ends
    unwritten, and the sweep returns its report of the finished ones, whose tables are already written."""
    def stop(signum, frame):
        raise SweepStopped(f"{signal.Signals(signum).name} received")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_autotune(args) -> int:
    backends = ["triton", "tilelang"] if args.backend == "all" else [args.backend]
    phases = ("fwd", "bwd") if args.phase == "all" else (args.phase,)
    shapes = parse_shapes(args.shapes, args.dtype)
    specs = resolve_specs(args.spec)
    root = Path(args.out_dir) if args.out_dir else table_root()
    if args.list:
        tasks, problems = build_tasks(specs, backends, shapes, phases)
        if args.only_stale:
            gpu = forced_gpu() or (gpu_name() if torch.cuda.is_available() else None)
            if gpu is None:
                print("--only-stale --list reads the tables of the GPU it runs on: run it there, or name the GPU's "
                      "table folder in SLA_DSL_AUTOTUNE_GPU")
                return 2
            tasks = stale_tasks(tasks, root, gpu)
        for task in tasks:
            space = tuning_space(task.kernels, task.shape, task.phase)
            default = default_config(task.kernels, task.shape, task.phase)
            print(f"{task.label}: {len(space)} configs ({len(space.moves(default))} one key from the default), "
                  f"default [{config_label(default)}]")
        return 1 if problems and not tasks else 0
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("autotune needs a CUDA GPU (torch.cuda.is_available() is False); run it on the GPU machine. "
              "`--list` shows the tuning spaces without one.")
        return 2
    gpu = gpu_name() if device == "cuda" else "cpu"
    started = time.time()
    tasks, problems = build_tasks(specs, backends, shapes, phases)
    if not tasks:
        print("nothing to tune:\n  " + "\n  ".join(problems))
        return 1
    if args.only_stale:
        tasks = stale_tasks(tasks, root, gpu)
        if not tasks:
            return 1 if problems else 0
    tasks = [dataclasses.replace(task, seeds=table_seeds(task, root, gpu)) for task in tasks]
    print(f"autotune on {gpu}: {len(tasks)} task(s) ({len({(t.spec.name, t.backend) for t in tasks})} "
          f"spec/backend pair(s) x {len(shapes)} shape(s) x {', '.join(phases)}), budget {args.budget_seconds:.0f} s; "
          f"tables under {root / gpu}", flush=True)
    # every timing and reference check runs in a worker process: a config that crashes it is counted, and
    # the next one gets a fresh worker
    worker = IsolatedDevice(DeviceWork(device, args.tolerance_scale), timeout_s=args.worker_timeout)
    jobs = args.jobs if args.jobs is not None else (default_jobs() if device == "cuda" else 0)
    compiler = Precompiler(jobs) if jobs > 0 else None
    written: list[str] = []

    def on_result(result):
        if result.config is None:
            return
        task = result.task
        path = table_path(gpu, task.backend, task.spec.name, root)
        bucket = task.shape.bucket()
        update_table(path, spec_name=task.spec.name, spec_sha256=task.spec.source_sha256, backend=task.backend,
                     gpu=gpu, source_sha256=source_hash(task.spec, task.backend),
                     phase_source_sha256=phase_source_hashes(task.spec, task.backend),
                     entries={bucket.key: {"shape": task.shape.as_dict(), task.phase: result.entry()}})
        if str(path) not in written:
            written.append(str(path))

    from tqdm import tqdm

    progress = None if args.no_progress else (lambda **kw: tqdm(leave=False, dynamic_ncols=True, **kw))
    try:
        with sigterm_stops_the_sweep():
            report = sweep(tasks, measure=worker.measure, verify=worker.verify, budget_seconds=args.budget_seconds,
                           on_result=on_result, progress=progress, log=stderr_log, compiler=compiler)
    finally:
        worker.close()
        if compiler is not None:
            compiler.close()
    print(report.summary())
    print(f"  {worker.summary()}")
    if compiler is not None:
        print(f"  {compiler.summary()}")
    for line in problems:
        print(f"  skipped: {line}")
    print(f"wrote {len(written)} table(s):" + "".join(f"\n  {p}" for p in written))
    print(f"autotune wall time {time.time() - started:.1f} s")
    bad = report.aborted or any(r.config is None for r in report.results)
    return 1 if bad else 0


def add_arguments(parser) -> None:
    parser.add_argument("--spec", action="append", default=None, metavar="PATH|NAME",
                        help="spec file or seed name (repeatable or comma-separated; default: all seed specs)")
    parser.add_argument("--backend", choices=("triton", "tilelang", "all"), default="all")
    parser.add_argument("--shapes", default=None, metavar="BxTxHxK[xV][:varlen],...",
                        help="shapes to tune (default: 4x8192x16x128,8x2048x16x64,1x32768x16x128)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the shapes (default bfloat16)")
    parser.add_argument("--phase", choices=("fwd", "bwd", "all"), default="all",
                        help="the phases to tune (default all). One phase: after a change to kernels only it "
                             "runs, whose other phase's entries the tables keep (their phase source hash)")
    parser.add_argument("--only-stale", action="store_true",
                        help="leave out the tasks whose bucket and phase this GPU's table already holds for the "
                             "kernels generated now: after a template change, re-tune what it changed")
    parser.add_argument("--budget-seconds", type=float, default=480.0,
                        help="wall-time budget for the search, shared out over all tasks (default 480). Each "
                             "task's default and table seeds are compiled and timed even past it, so a sweep of "
                             "many tasks with cold compiles runs longer (13 TileLang tasks: 528 s for 400)")
    parser.add_argument("--out-dir", default=None, help="table root (default: autotune/ or $SLA_DSL_AUTOTUNE_DIR)")
    parser.add_argument("--tolerance-scale", type=float, default=1.0,
                        help="multiply the reference-check tolerances of sla_dsl.testing (default 1)")
    parser.add_argument("--list", action="store_true", help="print each task's tuning space size; no GPU needed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="processes compiling configs ahead of their timing (default: the cores less two, at "
                             "most 16, on cuda; 0 on cpu, where the interpreter compiles nothing)")
    parser.add_argument("--worker-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help="seconds one timing or reference check (a first compile included) may take in the "
                             "worker process before the config counts as crashed and the worker is replaced "
                             f"(default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a smoke run of the driver (tables go under <out-dir>/cpu/); no real timings")
