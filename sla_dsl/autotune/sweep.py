"""The sweep driver behind `python -m sla_dsl autotune`.

For every task (spec, backend, shape, phase): time the default config, then the rest of the backend's
tuning space (default first, the rest in a deterministic shuffle so a sweep cut short by the budget still
samples the whole space), re-time the best few with longer runs, check the winner against the float64
reference at a small shape with that config (falling back to the next best when it fails), and write it.
Configs that fail to compile or do not fit the GPU are skipped and counted; any other error counts as failed.

Timing and verification are injected (`measure`, `verify`), so the driver runs on CPU with fake kernels.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field

from sla_dsl.autotune.protocol import config_key, config_label, default_config, tuning_space
from sla_dsl.autotune.shapes import Shape

FINALISTS = 3  # re-timed precisely before choosing
MAX_VERIFY = 5  # candidates tried in order of time before falling back to the default

_SKIP_TYPES = {"ConfigRejected", "CompilationError", "CompileTimeAssertionFailure", "OutOfResources",
               "OutOfMemoryError", "PTXASError", "TileLangError", "TVMError"}
_SKIP_WORDS = ("out of resource", "outofresources", "shared memory", "compil", "ptxas", "too many resources",
               "registers", "exceeds", "out of memory", "unsupported config")
_FATAL_WORDS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                "misaligned address", "illegal instruction", "cuda error: an illegal")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_skippable(exc: BaseException) -> bool:
    """A config that does not compile or does not fit: expected while sweeping, counted as skipped."""
    for e in _chain(exc):
        if type(e).__name__ in _SKIP_TYPES:
            return True
        if any(word in str(e).lower() for word in _SKIP_WORDS):
            return True
    return False


def is_fatal(exc: BaseException) -> bool:
    """An error that leaves the CUDA context unusable: the sweep stops (results so far are kept)."""
    return any(word in str(e).lower() for e in _chain(exc) for word in _FATAL_WORDS)


class FatalDeviceError(RuntimeError):
    pass


@dataclass
class Task:
    kernels: object
    spec: object
    backend: str
    shape: Shape
    phase: str  # 'fwd' | 'bwd'

    @property
    def label(self) -> str:
        return f"{self.spec.name}/{self.backend} {self.shape} {self.phase}"


@dataclass
class TaskResult:
    task: Task
    config: dict | None = None
    ms: float | None = None
    default_config: dict | None = None
    default_ms: float | None = None
    verified: dict | None = None  # relative errors of the written config
    space: int = 0
    tried: int = 0
    skipped: int = 0
    failed: int = 0
    rejected: int = 0  # timed fine but failed the reference check
    unexplored: int = 0  # left out by the budget
    errors: list[str] = field(default_factory=list)
    error: str | None = None  # why nothing was written

    def entry(self) -> dict:
        """This phase's part of a table entry."""
        return {"config": self.config, "ms": self.ms, "default_config": self.default_config,
                "default_ms": self.default_ms, "verified": self.verified, "space": self.space,
                "tried": self.tried, "skipped": self.skipped, "failed": self.failed + self.rejected,
                "unexplored": self.unexplored}


@dataclass
class SweepReport:
    results: list[TaskResult]
    wall_s: float
    aborted: str | None = None

    def total(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.results)

    def summary(self) -> str:
        lines = [f"autotune: {len(self.results)} task(s) in {self.wall_s:.1f} s: tried {self.total('tried')}, "
                 f"skipped {self.total('skipped')} (compile/resources), failed {self.total('failed')}, "
                 f"rejected by the reference check {self.total('rejected')}, unexplored (budget) "
                 f"{self.total('unexplored')}"]
        for r in self.results:
            if r.config is None:
                lines.append(f"  {r.task.label}: NOT WRITTEN ({r.error})")
                continue
            gain = (f", {r.default_ms / r.ms:.2f}x vs default {r.default_ms:.3f} ms"
                    if r.default_ms and r.ms else "")
            lines.append(f"  {r.task.label}: {r.ms:.3f} ms{gain} [{config_label(r.config)}] "
                         f"({r.tried}/{r.space} timed, {r.skipped} skipped, {r.failed} failed)")
        if self.aborted:
            lines.append(f"  ABORTED: {self.aborted}")
        return "\n".join(lines)


def ordered_space(task: Task) -> tuple[dict, list[dict]]:
    """(default, configs): the default first, then the rest of the space shuffled by a seed of the task."""
    default = default_config(task.kernels, task.shape, task.phase)
    rest, seen = [], {config_key(default)}
    for config in tuning_space(task.kernels, task.shape, task.phase):
        if config_key(config) not in seen:
            seen.add(config_key(config))
            rest.append(config)
    random.Random(f"{task.spec.name}/{task.backend}/{task.shape.key}/{task.phase}").shuffle(rest)
    return default, [default, *rest]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def run_task(task: Task, *, measure, verify, deadline: float, clock=time.monotonic, progress=None) -> TaskResult:
    """Sweeps one task until `deadline` (the default is always timed) and picks a verified winner."""
    result = TaskResult(task)
    try:
        default, configs = ordered_space(task)
    except Exception as exc:  # noqa: BLE001
        result.error = f"tuning_space/default_config failed: {_short(exc)}"
        return result
    result.space, result.default_config = len(configs), default
    timed: list[tuple[float, int, dict]] = []
    bar = progress(total=len(configs), desc=task.label) if progress else None
    best = None
    try:
        for index, config in enumerate(configs):
            if index > 0 and clock() > deadline:
                result.unexplored = len(configs) - index
                break
            if bar is not None:
                bar.set_postfix_str(f"try [{config_label(config)}] best "
                                    + (f"{best[0]:.3f} ms [{config_label(best[2])}]" if best else "-"))
            try:
                ms = float(measure(task, config, precise=False))
            except Exception as exc:  # noqa: BLE001 -- a bad config never stops the sweep
                if is_fatal(exc):
                    raise FatalDeviceError(f"{task.label} [{config_label(config)}]: {_short(exc)}") from exc
                if is_skippable(exc):
                    result.skipped += 1
                else:
                    result.failed += 1
                    if len(result.errors) < 5:
                        result.errors.append(f"[{config_label(config)}] {_short(exc)}")
            else:
                result.tried += 1
                timed.append((ms, index, config))
                if index == 0:
                    result.default_ms = ms
                if best is None or ms < best[0]:
                    best = (ms, index, config)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if not timed:
        result.error = "no config ran" + (f" (e.g. {result.errors[0]})" if result.errors else "")
        return result
    timed.sort(key=lambda item: (item[0], item[1]))
    finalists = timed[:FINALISTS]
    if all(index != 0 for _, index, _ in finalists) and result.default_ms is not None:
        finalists.append((result.default_ms, 0, default))
    precise = []
    for ms, index, config in finalists:
        try:
            precise.append((float(measure(task, config, precise=True)), index, config))
        except Exception as exc:  # noqa: BLE001
            if is_fatal(exc):
                raise FatalDeviceError(f"{task.label}: {_short(exc)}") from exc
            precise.append((ms, index, config))
        if index == 0:
            result.default_ms = precise[-1][0]
    precise.sort(key=lambda item: (item[0], item[1]))
    candidates = precise + [t for t in timed if all(t[1] != p[1] for p in precise)]
    attempts = [c for c in candidates[:MAX_VERIFY]]
    if all(index != 0 for _, index, _ in attempts):
        attempts += [c for c in candidates if c[1] == 0]
    for ms, index, config in attempts:
        try:
            ok, errors = verify(task, config)
        except Exception as exc:  # noqa: BLE001
            if is_fatal(exc):
                raise FatalDeviceError(f"{task.label}: verification: {_short(exc)}") from exc
            ok, errors = False, {"exception": _short(exc)}
        if ok:
            result.config, result.ms, result.verified = config, ms, errors
            return result
        result.rejected += 1
        if len(result.errors) < 5:
            result.errors.append(f"[{config_label(config)}] failed the reference check: {errors}")
    result.error = "no timed config passed the reference check" + (
        f" ({result.errors[-1]})" if result.errors else "")
    return result


def sweep(tasks: list[Task], *, measure, verify, budget_seconds: float, on_result=None, clock=time.monotonic,
          progress=None, log=None) -> SweepReport:
    """Runs every task within the budget (shared out evenly; time a task leaves unused goes to the rest).
    `on_result(result)` is called after each task (the CLI writes the table there)."""
    start = clock()
    results: list[TaskResult] = []
    aborted = None
    for number, task in enumerate(tasks):
        remaining = budget_seconds - (clock() - start)
        share = max(remaining, 0.0) / (len(tasks) - number)
        # leave a fifth of the share for the precise re-timing and the reference check
        deadline = clock() + 0.8 * share
        try:
            result = run_task(task, measure=measure, verify=verify, deadline=deadline, clock=clock,
                              progress=progress)
        except FatalDeviceError as exc:
            aborted = f"{exc} -- the CUDA context is unusable; rerun for the remaining tasks"
            results.append(TaskResult(task, error=str(exc)))
            break
        results.append(result)
        if log is not None:
            log(f"{task.label}: " + (f"{result.ms:.3f} ms [{config_label(result.config)}]"
                                     if result.config else f"not written: {result.error}"))
        if on_result is not None:
            on_result(result)
    return SweepReport(results, clock() - start, aborted)


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
