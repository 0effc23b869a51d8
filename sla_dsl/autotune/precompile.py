"""Compiling the sweep's configs ahead of their timing, in worker processes.

Compiling dominates a sweep: a Triton stage takes seconds to compile and a TileLang kernel up to half a
minute, while timing a config takes a fraction of a second. Workers call the backend's forward or backward
with `compile_only=True` on the timing's arguments at a tiny length (same dtypes, head count and dims, hence
the same kernel specialisations), which compiles without launching anything, so the GPU stays quiet for the
timings, and leaves the binaries in Triton's and TileLang's on-disk caches, where the sweeping process loads
them in milliseconds. Jobs start in order of priority (the task being timed first, then the first round of
the tasks after it), each (backend, spec, H, K, V, dtype, phase, config) once. Failures cost only time: a
config a worker could not compile is compiled again by the sweeping process (in its timing worker), which
reports the real error. A worker that dies breaks the whole pool: the pool is replaced, the config that
worker was compiling counts as failed, and the others that were running go back to the queue.

While the sweep re-times its finalists (`Precompiler.paused`), the workers and the compilers they run are
stopped, so that the timings that choose the winner do not share the host with compiles: at 8x2048x16x64 on
the H100, timings taken beside 14 compiling workers were up to twice the bench's for the same config.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
from dataclasses import dataclass, field

from sla_dsl.autotune.isolate import describe_exit
from sla_dsl.autotune.space import config_key
from sla_dsl.autotune.sweep import RemoteError, is_skippable

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
    call of `shape` resolves to, the backend's fixed settings included: its constructor's or the environment's,
    e.g. $SLA_DSL_TILELANG_CONFIG)."""
    import torch

    from sla_dsl.autotune.protocol import is_tunable, override_config, resolve_config
    from sla_dsl.autotune.runner import call_arguments
    from sla_dsl.autotune.shapes import Shape
    from sla_dsl.backends import build_backend

    key = (backend, spec.name, spec.source_sha256)
    if key not in _built:
        _built[key] = build_backend(backend, spec)
    kernels = _built[key]
    if config is None and is_tunable(kernels):  # resolved for the real shape: the tiny one has another bucket
        fixed = override_config(kernels, spec, backend, shape, phase, getattr(kernels, "config", None))
        config = resolve_config(kernels, spec, backend, shape, phase, fixed)
    tiny = Shape(min(shape.B, 2), 16, shape.H, shape.K, shape.V, shape.dtype, shape.varlen)
    positional, cu_seqlens, scale, do, dfinal = call_arguments(spec, tiny, "cuda" if torch.cuda.is_available()
                                                               else "cpu")
    if phase == "fwd":
        kernels.forward(*positional, cu_seqlens, scale, True, config=config, compile_only=True)
    else:
        kernels.backward(*positional, cu_seqlens, scale, do, dfinal, config=config, compile_only=True)


def spawn_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)


def _portable(job, *args) -> None:
    """Runs `job` in a pool worker; any error it raises comes back as a RemoteError. A worker whose exception
    does not pickle (TileLang's compile errors are tvm ffi objects) dies sending it back and takes the whole
    pool with it: the H100 sweep of 2026-11-23 replaced its pool four times for configs that merely did not
    compile."""
    try:
        job(*args)
    except Exception as exc:  # noqa: BLE001 -- every error, as something the parent can unpickle
        raise RemoteError(type(exc).__name__, str(exc), is_skippable(exc)) from None


def _error_name(exc: BaseException) -> str:
    return exc.type_name if isinstance(exc, RemoteError) else type(exc).__name__


def _marked(marks: str, number: int, job, *args) -> None:
    """Runs `job` in a pool worker after writing its number to marks/<pid> (so the job a dead worker was
    running is known)."""
    with open(os.path.join(marks, str(os.getpid())), "w") as handle:
        handle.write(str(number))
    _portable(job, *args)


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc; none where it is unavailable)."""
    found = []
    for children in (f"/proc/{pid}/task/{tid}/children" for tid in _threads(pid)):
        try:
            with open(children) as handle:
                found += [int(child) for child in handle.read().split()]
        except OSError:
            pass
    return found


def _threads(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def _stop_tree(pid: int, stopped: list[int]) -> None:
    """SIGSTOPs `pid`, then its descendants (each after its parent, which then starts no more), into
    `stopped`."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except OSError:  # ended meanwhile
        return
    stopped.append(pid)
    for child in _children(pid):
        _stop_tree(child, stopped)


@dataclass
class _Job:
    number: int
    key: tuple
    args: tuple
    priority: int
    started: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class Precompiler:
    """A pool of `workers` compile processes fed by priority (see the module docstring). `make_pool(workers)`
    and `job` replace the process pool and `compile_config` (tests).

    A worker that dies (a crash in a compiler) breaks the whole pool: every job in it fails with
    BrokenProcessPool. The pool is replaced; the job the dead worker was running (each worker writes the
    number of its job to a file named by its pid) counts as failed, the others go back to the queue. After
    MAX_POOL_DEATHS broken pools no more are started (the sweep compiles what is left)."""

    MAX_POOL_DEATHS = 5

    def __init__(self, workers: int, *, make_pool=spawn_pool, job=compile_config):
        self._make_pool, self._job, self._slots = make_pool, job, workers
        self._marks = tempfile.mkdtemp(prefix="sla_dsl-compile-")
        self._executor = make_pool(workers)
        self._generation = 0  # of the pool: a broken one is replaced once
        self._dead: dict[int, dict[int, str]] = {}  # generation of a broken pool -> {job number: how it died}
        self._lock = threading.RLock()
        self._queue: list[tuple[int, int, tuple]] = []  # (priority, sequence, job key)
        self._sequence = itertools.count()
        self._jobs: dict[tuple, _Job] = {}
        self._running = 0
        self._stopped: str | None = None  # why no more jobs start (the summary says it)
        self._closed = False
        self.compiled = self.failed = self.pool_deaths = 0
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
                    job = self._jobs[key] = _Job(len(self._jobs), key, (task.backend, task.spec, task.shape,
                                                                        task.phase, dict(config)), priority)
                elif job.started or job.priority <= priority:
                    continue
                job.priority = priority
                heapq.heappush(self._queue, (priority, next(self._sequence), key))
            self._start()

    def _start(self) -> None:
        with self._lock:
            while self._running < self._slots and self._queue and self._stopped is None and not self._closed:
                priority, _, key = heapq.heappop(self._queue)
                job = self._jobs[key]
                if job.started or job.priority != priority:  # started already, or re-queued at a higher priority
                    continue
                generation, pool = self._generation, self._executor
                try:
                    future = pool.submit(_marked, self._marks, job.number, self._job, *job.args)
                except BrokenProcessPool:  # a worker died since the last job started: a new pool, then again
                    self._replace_pool(generation)
                    heapq.heappush(self._queue, (priority, next(self._sequence), key))
                    continue
                except Exception as exc:  # noqa: BLE001 -- the sweep compiles by itself
                    self._stop(f"the compile pool stopped ({type(exc).__name__}: {exc})")
                    return
                job.started = True
                self._running += 1
                future.add_done_callback(lambda f, job=job, pool=pool, generation=generation:
                                         self._finished(f, job, pool, generation))

    def _replace_pool(self, generation: int) -> None:
        """A new pool for the broken one of `generation` (once; not after MAX_POOL_DEATHS)."""
        if generation != self._generation or self._stopped is not None or self._closed:
            return
        self.pool_deaths += 1
        if self.pool_deaths > self.MAX_POOL_DEATHS:
            self._stop(f"compile workers died {self.pool_deaths} times: no more were started")
            return
        # the broken pool ends its own workers
        self._generation += 1
        self._executor = self._make_pool(self._slots)

    def _dead_workers(self, pool, generation: int) -> dict[int, str]:
        """{job number: how its worker ended} for the workers of the broken pool `pool` that died, read once (the
        jobs' callbacks run before the broken pool ends its other workers)."""
        if generation not in self._dead:
            dead = {}
            processes = list((getattr(pool, "_processes", None) or {}).values())
            ended = set(wait([process.sentinel for process in processes], timeout=0)) if processes else set()
            for process in processes:
                if process.sentinel not in ended:
                    continue
                process.join(1.0)  # it has ended: its exit code
                try:
                    with open(os.path.join(self._marks, str(process.pid))) as handle:
                        dead[int(handle.read())] = describe_exit(process.exitcode)
                except (OSError, ValueError):  # died before its first job
                    continue
            self._dead[generation] = dead
        return self._dead[generation]

    def _fail(self, why: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(why)

    def _finished(self, future, job: _Job, pool, generation: int) -> None:
        with self._lock:
            self._running -= 1
            if self._closed:  # ended by close(): no result wanted, not a failure
                job.done.set()
                return
            try:
                future.result()
            except BrokenProcessPool:
                died = self._dead_workers(pool, generation).get(job.number)
                self._replace_pool(generation)
                if died is None and self._stopped is None:  # another job's worker died: again, in the new pool
                    job.started = False
                    heapq.heappush(self._queue, (job.priority, next(self._sequence), job.key))
                    self._start()
                    return
                self._fail(f"BrokenProcessPool: its compile worker died ({died})" if died else
                           "BrokenProcessPool: a compile worker died while it compiled")
            except Exception as exc:  # noqa: BLE001 -- counted; the sweep recompiles and reports it
                self._fail(f"{_error_name(exc)}: {str(exc).strip()[:300]}")
            else:
                self.compiled += 1
            job.done.set()
            self._start()

    def _stop(self, why: str) -> None:
        self._stopped = self._stopped or why
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
                heapq.heappush(self._queue, (URGENT, next(self._sequence), job.key))
                self._start()
        return job.done.wait(timeout)

    @contextlib.contextmanager
    def paused(self):
        """While it lasts, every compile worker and the compilers it runs (nvcc, ptxas) are stopped (SIGSTOP);
        they go on where they were after it (SIGCONT). Jobs finish later, none fails. No-op without SIGSTOP."""
        stopped: list[int] = []
        if hasattr(signal, "SIGSTOP"):
            with self._lock:
                workers = [process.pid for process in (getattr(self._executor, "_processes", None) or {}).values()]
            for pid in workers:
                _stop_tree(pid, stopped)
        try:
            yield
        finally:
            for pid in stopped:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGCONT)

    def summary(self) -> str:
        text = f"precompiled {self.compiled} config(s) in {self._slots} worker(s), {self.failed} failed there"
        if self.pool_deaths:
            text += f"; a compile worker died {self.pool_deaths} time(s), each time the pool was replaced"
        if self._stopped:
            text += f"; {self._stopped}"
        return text + "".join(f"\n    {e}" for e in self.errors)

    def close(self) -> None:
        """Drops queued jobs and ends the workers, including any still compiling (their results are no longer
        wanted, and not counted; Triton and TileLang write their caches atomically, so nothing half-written
        stays behind)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            for job in self._jobs.values():
                job.done.set()
        # ProcessPoolExecutor has no public way to end running jobs before Python 3.14 (terminate_workers);
        # without ending them, exiting would wait for the slowest compile in flight. Its worker table is
        # dropped by shutdown(), so it is read first.
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        shutil.rmtree(self._marks, ignore_errors=True)


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
    with spawn_pool(workers) as pool:
        futures = {pool.submit(_portable, compile_config, backend, spec, shape, phase, None):
                   (backend, spec.name, shape, phase) for backend, spec, shape, phase in unique}
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"compiling ahead ({workers} workers)",
                           leave=False):
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 -- reported; the run itself compiles again and fails in context
                backend, name, shape, phase = futures[future]
                failures.append(f"{name}/{backend} {phase} {shape}: {_error_name(exc)}: {str(exc).strip()[:200]}")
    return failures
