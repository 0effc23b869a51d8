"""Compiling the sweep's configs ahead of their timing, in worker processes.

Compiling dominates a sweep: a Triton stage takes seconds to compile and a TileLang kernel up to half a
minute, while timing a config takes a fraction of a second. Workers call the backend's forward or backward
with `compile_only=True` on the timing's arguments at a tiny length (same dtypes, head count and dims, hence
the same kernel specialisations), which compiles without launching anything, so the GPU stays quiet for the
timings, and leaves the binaries in Triton's and TileLang's on-disk caches, where the sweeping process loads
them in milliseconds. Jobs start in order of priority (the task being timed first, then the first round of
the tasks after it), each (backend, spec, H, K, V, dtype, phase, config) once. Failures cost only time: a
config a worker could not compile is compiled again by the sweeping process, which reports the real error.
"""

from __future__ import annotations

import heapq
import itertools
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from sla_dsl.autotune.space import config_key

URGENT = -1  # the priority of a job the sweep waits for


def _init_worker() -> None:
    # compile jobs are single-threaded: keep many workers from oversubscribing the cores, and the timing
    # process (launches, synchronisation) ahead of them
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    try:
        os.nice(10)
    except OSError:
        pass


_built: dict[tuple, object] = {}


def compile_config(backend: str, spec, shape, phase: str, config: dict | None) -> None:
    """The worker's job: compile what `config` runs for `phase` at `shape`'s H, K, V and dtype (None: what a
    call of `shape` resolves to)."""
    import torch

    from sla_dsl.autotune.protocol import is_tunable, resolve_config
    from sla_dsl.autotune.runner import call_arguments
    from sla_dsl.autotune.shapes import Shape
    from sla_dsl.backends import build_backend

    key = (backend, spec.name, spec.source_sha256)
    if key not in _built:
        _built[key] = build_backend(backend, spec)
    kernels = _built[key]
    if config is None and is_tunable(kernels):  # resolved for the real shape: the tiny one has another bucket
        config = resolve_config(kernels, spec, backend, shape, phase)
    tiny = Shape(min(shape.B, 2), 16, shape.H, shape.K, shape.V, shape.dtype, shape.varlen)
    positional, cu_seqlens, scale, do, dfinal = call_arguments(spec, tiny, "cuda" if torch.cuda.is_available()
                                                               else "cpu")
    if phase == "fwd":
        kernels.forward(*positional, cu_seqlens, scale, True, config=config, compile_only=True)
    else:
        kernels.backward(*positional, cu_seqlens, scale, do, dfinal, config=config, compile_only=True)


@dataclass
class _Job:
    args: tuple
    priority: int
    started: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class Precompiler:
    """A pool of `workers` compile processes fed by priority (see the module docstring). `executor` and `job`
    replace the process pool and `compile_config` (tests)."""

    def __init__(self, workers: int, *, executor=None, job=compile_config):
        self._executor = executor or ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                         initializer=_init_worker)
        self._job, self._slots = job, workers
        self._lock = threading.RLock()
        self._queue: list[tuple[int, int, tuple]] = []  # (priority, sequence, job key)
        self._sequence = itertools.count()
        self._jobs: dict[tuple, _Job] = {}
        self._running = 0
        self._stopped: str | None = None
        self.compiled = self.failed = 0
        self.errors: list[str] = []

    @staticmethod
    def job_key(task, config: dict) -> tuple:
        s = task.shape
        return (task.backend, task.spec.name, task.spec.source_sha256, s.H, s.K, s.V, s.dtype, task.phase,
                config_key(config))

    def request(self, task, configs, priority: int) -> None:
        """Queues `configs` of `task` (a sweep Task) at `priority` (lower starts first)."""
        with self._lock:
            for config in configs:
                key = self.job_key(task, config)
                job = self._jobs.get(key)
                if job is None:
                    job = self._jobs[key] = _Job((task.backend, task.spec, task.shape, task.phase, dict(config)),
                                                 priority)
                elif job.started or job.priority <= priority:
                    continue
                job.priority = priority
                heapq.heappush(self._queue, (priority, next(self._sequence), key))
            self._start()

    def _start(self) -> None:
        with self._lock:
            while self._running < self._slots and self._queue and self._stopped is None:
                priority, _, key = heapq.heappop(self._queue)
                job = self._jobs[key]
                if job.started or job.priority != priority:  # started already, or re-queued at a higher priority
                    continue
                try:
                    future = self._executor.submit(self._job, *job.args)
                except Exception as exc:  # noqa: BLE001 -- a broken pool: the sweep compiles by itself
                    self._stop(f"the compile pool stopped ({type(exc).__name__}: {exc})")
                    return
                job.started = True
                self._running += 1
                future.add_done_callback(lambda f, job=job: self._finished(f, job))

    def _finished(self, future, job: _Job) -> None:
        with self._lock:
            self._running -= 1
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 -- counted; the sweep recompiles and reports it
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(f"{type(exc).__name__}: {str(exc).strip()[:300]}")
                if type(exc).__name__ == "BrokenProcessPool":
                    self._stop("a compile worker died (BrokenProcessPool)")
            else:
                self.compiled += 1
            job.done.set()
            self._start()

    def _stop(self, why: str) -> None:
        self._stopped = why
        self._queue.clear()
        for job in self._jobs.values():
            job.done.set()

    def wait(self, task, config: dict, timeout: float) -> bool:
        """True when `config` is compiled, failed in a worker, was never requested, or the pool stopped (the
        caller then compiles it itself); False when it is still compiling after `timeout` seconds."""
        with self._lock:
            job = self._jobs.get(self.job_key(task, config))
            if job is None:
                return True
            if not job.started and job.priority != URGENT:
                job.priority = URGENT
                heapq.heappush(self._queue, (URGENT, next(self._sequence), self.job_key(task, config)))
                self._start()
        return job.done.wait(timeout)

    def summary(self) -> str:
        text = f"precompiled {self.compiled} config(s) in {self._slots} worker(s), {self.failed} failed there"
        if self._stopped:
            text += f"; {self._stopped}"
        return text + "".join(f"\n    {e}" for e in self.errors)

    def close(self) -> None:
        """Drops queued jobs and ends the workers, including any still compiling (their results are no longer
        wanted; Triton and TileLang write their caches atomically, so nothing half-written stays behind)."""
        with self._lock:
            self._stop(self._stopped or "closed")
        # ProcessPoolExecutor has no public way to end running jobs before Python 3.14 (terminate_workers);
        # without ending them, exiting would wait for the slowest compile in flight. Its worker table is
        # dropped by shutdown(), so it is read first.
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()


def compile_ahead(jobs: list[tuple], workers: int | None = None) -> list[str]:
    """Compiles every (backend, spec, shape, phase) of `jobs` with the config a call of that shape resolves to
    (the tuned table's, else the default), in parallel worker processes, before a run that launches them
    one after another (bench, gpu-check): TileLang's compiles take up to half a minute each and would
    otherwise run back to back. Returns one line per job that failed there (the run meets the error again,
    with its context)."""
    from tqdm import tqdm

    unique = list(dict.fromkeys(jobs))
    if not unique:
        return []
    workers = workers or max(1, min(len(unique), (os.cpu_count() or 2) - 1))
    failures = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker) as pool:
        futures = {pool.submit(compile_config, backend, spec, shape, phase, None): (backend, spec.name, shape, phase)
                   for backend, spec, shape, phase in unique}
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"compiling ahead ({workers} workers)",
                           leave=False):
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 -- reported; the run itself compiles again and fails in context
                backend, name, shape, phase = futures[future]
                failures.append(f"{name}/{backend} {phase} {shape}: {type(exc).__name__}: {str(exc).strip()[:200]}")
    return failures
