"""The sweep driver behind `python -m sla_dsl autotune`.

For every task (spec, backend, shape, phase): time the default config and the task's seeds (the winners the
GPU's table holds for the spec, and its siblings' for the bucket, `runner.table_seeds`: a warm start, timed
whatever the budget, so that a search cut short never leaves a bucket slower than the table's configs would run
it), then search the
backend's tuning space from the fastest of them that passes the check, by coordinate moves: each round times
every config one key away from the best so far (the keys that matter most first, so a task cut short by its
budget has tried them), then the combination of every improving move
(the stages of a phase are separate kernels, so their gains add up), and starts the next round from the
fastest config that passes the check against the float64 reference. It stops when a round finds nothing
faster, after MAX_ROUNDS, or at the task's deadline. The best few are re-timed with longer runs, and the
fastest that passes the reference check (at a small shape with that config) is written. Budget left when every
task has run goes back to the tasks their deadline stopped, which go on where they stopped and are written
again. Configs that fail to compile or do not fit the GPU are skipped and counted; one that crashes the process
timing it (`ConfigCrashed`) is counted as crashed and never chosen; any other error counts as failed.

Timing and verification are injected (`measure`, `verify`), so the driver runs on CPU with fake kernels; the
CLI passes those of `isolate.IsolatedDevice`, which run them in a worker process that a crashing config may
kill. Compilation ahead of timing is injected too (`compiler`, see `precompile`); the driver feeds it with the
configs it is about to time.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field

from sla_dsl.autotune.protocol import config_label, default_config, tuning_space
from sla_dsl.autotune.shapes import Shape
from sla_dsl.autotune.space import config_key

MAX_ROUNDS = 3  # rounds of one-key moves, each from the fastest config so far
FINALISTS = 3  # re-timed precisely before choosing
MAX_VERIFY = 5  # candidates tried in order of time before falling back to the default
DEFAULT_COMPILE_WAIT_S = 600.0  # the default is always timed: wait this long for a worker, then compile here
MIN_RESUME_S = 10.0  # the least budget left per stopped task that resumes them: less would time next to nothing

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
        if isinstance(e, RemoteError):
            return e.skippable  # classified where it was raised, with its whole chain
        if type(e).__name__ in _SKIP_TYPES:
            return True
        if any(word in str(e).lower() for word in _SKIP_WORDS):
            return True
    return False


def is_fatal(exc: BaseException) -> bool:
    """An error that leaves the CUDA context unusable: the worker process that raised it is replaced and the
    config counts as crashed (see `isolate`)."""
    return any(word in str(e).lower() for e in _chain(exc) for word in _FATAL_WORDS)


class RemoteError(RuntimeError):
    """An error raised in the worker process that ran measure/verify, carried back as its type name, message and
    whether it was skippable there (the exception itself need not be picklable)."""

    def __init__(self, type_name: str, message: str, skippable: bool):
        super().__init__(message)
        self.type_name, self.skippable = type_name, skippable

    def __reduce__(self):  # pickled with its three arguments (BaseException's default would pass only args)
        return type(self), (self.type_name, str(self), self.skippable)


class ConfigCrashed(RuntimeError):
    """Raised by measure/verify for a config that killed the process running it (a CUDA error that leaves the
    context unusable, a segfault, a hang) once that process has been replaced: counted as crashed, the sweep
    goes on."""


class SweepAborted(RuntimeError):
    """Raised by measure/verify when nothing can run any more (the worker process cannot start, or config after
    config kills it): the sweep stops and keeps what it has written."""


class SweepStopped(BaseException):
    """Raised in the sweep's process when it is asked to stop (runner.sigterm_stops_the_sweep: a `timeout` around
    the sweep): the task under way ends unwritten, the finished tasks' tables are kept and the summary still
    prints. A BaseException, like KeyboardInterrupt, so that no handler of a config's errors takes it for a
    failure of that config."""


@dataclass
class Task:
    kernels: object
    spec: object
    backend: str
    shape: Shape
    phase: str  # 'fwd' | 'bwd'
    # configs timed right after the default, the search starting from the fastest (runner.table_seeds)
    seeds: tuple = ()

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
    unexplored: int = 0  # moves the search wanted to time when the budget ran out
    rounds: int = 0  # search rounds started
    errors: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # configs that crashed the process timing or checking them
    error: str | None = None  # why nothing was written

    @property
    def crashed(self) -> int:
        return len(self.crashes)

    def entry(self) -> dict:
        """This phase's part of a table entry."""
        return {"config": self.config, "ms": self.ms, "default_config": self.default_config,
                "default_ms": self.default_ms, "verified": self.verified, "space": self.space,
                "tried": self.tried, "skipped": self.skipped, "failed": self.failed + self.rejected,
                "crashed": self.crashed, "unexplored": self.unexplored, "rounds": self.rounds}


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
                 f"crashed {self.total('crashed')} (killed the worker process, which was replaced), "
                 f"rejected by the reference check {self.total('rejected')}, unexplored (budget) "
                 f"{self.total('unexplored')}"]
        for r in self.results:
            if r.config is None:
                lines.append(f"  {r.task.label}: NOT WRITTEN ({r.error})")
            else:
                gain = (f", {r.default_ms / r.ms:.2f}x vs default {r.default_ms:.3f} ms"
                        if r.default_ms and r.ms else "")
                lines.append(f"  {r.task.label}: {r.ms:.3f} ms{gain} [{config_label(r.config)}] "
                             f"({r.tried} of {r.space} timed in {r.rounds} round(s), {r.skipped} skipped, "
                             f"{r.failed} failed, {r.crashed} crashed)")
            lines.extend(f"    crashed: {line}" for line in r.crashes)
        if self.aborted:
            lines.append(f"  ABORTED: {self.aborted}")
        return "\n".join(lines)


def start_of(task: Task):
    """(default, space) of a task; the default must lie in the space."""
    space = tuning_space(task.kernels, task.shape, task.phase)
    default = default_config(task.kernels, task.shape, task.phase)
    if default not in space:
        raise ValueError(f"default_config [{config_label(default)}] is not in the tuning space (keys "
                         f"{', '.join(space.keys)})")
    return default, space


def seeds_of(task: Task, default: dict, space) -> list[dict]:
    """The task's seeds that are settings of its space, once each, the default left out. A seed without a key
    the space has (a parameter the templates gained after it was tuned) takes the default's setting of it, so a
    re-sweep after such a change starts from the previous winners too; a schedule switch (Space.inactive) takes
    its first setting, the schedule that there was before (the default's could make the seed's settings
    inactive)."""
    out = []
    fill = {**default, **{key: space.first(key) for key in space.inactive}}
    for seed in task.seeds:
        config = {key: seed.get(key, fill[key]) for key in space.keys} if set(seed) <= set(space.keys) else seed
        if config in space and config != default and config not in out:
            out.append(config)
    return out


def first_round(task: Task) -> list[dict]:
    """The default, the seeds and the configs one key away from the default: what a task times first (compiled
    ahead)."""
    default, space = start_of(task)
    return [default, *seeds_of(task, default, space), *space.moves(default)]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    name = exc.type_name if isinstance(exc, RemoteError) else type(exc).__name__
    return f"{name}: {text[0][:200] if text else ''}"


def _combined(current: dict, current_ms: float, moved: list[tuple[float, dict]], space) -> dict | None:
    """`current` with the value of the fastest improving move of every key, when more than one key improved,
    less the moves of keys that the combination ignores (Space.inactive: a schedule that runs none of their
    kernels, which it would time again). A move of linked keys (Space.linked) changes two and is left out: its
    keys may clash with single moves."""
    best: dict[str, tuple[float, object]] = {}
    for ms, config in moved:
        changed = [k for k in config if config[k] != current[k]]
        if len(changed) != 1:
            continue
        (key,) = changed
        if ms < current_ms and (key not in best or ms < best[key][0]):
            best[key] = (ms, config[key])
    if len(best) < 2:
        return None
    config = {**current, **{key: value for key, (_, value) in best.items()}}
    ignored = space.ignored(config)
    if len(best.keys() - ignored) < 2:
        return None
    config = {**current, **{key: value for key, (_, value) in best.items() if key not in ignored}}
    return config if config in space else None


class _Search:
    """The state of one task's search: what was timed, skipped, failed and checked against the reference."""

    def __init__(self, task: Task, result: TaskResult, space, *, measure, verify, deadline, clock, compiler,
                 priority, bar):
        self.task, self.result, self.space = task, result, space
        self.measure, self.verify, self.deadline, self.clock = measure, verify, deadline, clock
        self.compiler, self.priority, self.bar = compiler, priority, bar
        self.wait_credit = max(0.0, deadline - clock())  # seconds of compile waiting that extend the deadline
        self.timed: dict[tuple, tuple[float, int, dict]] = {}  # config key -> (ms, order of timing, config)
        self.seen: set[tuple] = set()
        self.verdicts: dict[tuple, tuple[bool, dict]] = {}  # config key -> (passed, relative errors)

    def ms(self, config: dict) -> float:
        return self.timed.get(config_key(config), (float("inf"),))[0]

    def ranked(self) -> list[tuple[float, int, dict]]:
        """Timed configs not rejected by the reference check, fastest first (ties: the earlier timed)."""
        return sorted((t for k, t in self.timed.items() if self.verdicts.get(k, (True,))[0]),
                      key=lambda item: (item[0], item[1]))

    def crash(self, config: dict, exc: ConfigCrashed, during: str) -> None:
        """Counts a config that crashed the process running it; it is never chosen."""
        self.verdicts[config_key(config)] = (False, {"exception": f"crashed: {exc}"})
        self.result.crashes.append(f"[{config_label(config)}] {during}: {exc}")

    def attempt(self, config: dict, always: bool = False) -> bool:
        """Times `config` once (counting skips, failures and crashes); False when the deadline stopped it."""
        task, result = self.task, self.result
        if not always and self.clock() > self.deadline:
            return False
        if self.compiler is not None:
            waited_from = self.clock()
            timeout = (DEFAULT_COMPILE_WAIT_S if always
                       else max(0.0, self.deadline + self.wait_credit - waited_from))
            ready = self.compiler.wait(task, config, timeout)
            # the compile pool works through every task's first round in task order, so an early task waits for
            # compiles while the later ones' finish in the background: time spent waiting moves the deadline, up
            # to the task's share once more, and the tasks after it get what is left
            extension = min(self.clock() - waited_from, self.wait_credit)
            self.deadline += extension
            self.wait_credit -= extension
            if not ready and not always:
                return False
        order = len(self.seen)  # the default is 0
        self.seen.add(config_key(config))
        if self.bar is not None:
            top = self.ranked()[:1]
            self.bar.set_postfix_str(f"try [{config_label(config)}] best "
                                     + (f"{top[0][0]:.3f} ms [{config_label(top[0][2])}]" if top else "-"))
        try:
            ms = float(self.measure(task, config, precise=False))
        except SweepAborted:
            raise
        except ConfigCrashed as exc:
            self.crash(config, exc, "timing")
        except Exception as exc:  # noqa: BLE001 -- a bad config never stops the sweep
            if is_skippable(exc):
                result.skipped += 1
            else:
                result.failed += 1
                if len(result.errors) < 5:
                    result.errors.append(f"[{config_label(config)}] {_short(exc)}")
        else:
            result.tried += 1
            self.timed[config_key(config)] = (ms, order, config)
            if order == 0:
                result.default_ms = ms
        if self.bar is not None:
            self.bar.update(1)
        return True

    def passes(self, config: dict) -> bool:
        """The reference check of `config` (once per config)."""
        key = config_key(config)
        if key not in self.verdicts:
            try:
                self.verdicts[key] = self.verify(self.task, config)
            except SweepAborted:
                raise
            except ConfigCrashed as exc:
                self.crash(config, exc, "reference check")
                return False
            except Exception as exc:  # noqa: BLE001
                self.verdicts[key] = (False, {"exception": _short(exc)})
            if not self.verdicts[key][0]:
                self.result.rejected += 1
                if len(self.result.errors) < 5:
                    self.result.errors.append(f"[{config_label(config)}] failed the reference check: "
                                              f"{self.verdicts[key][1]}")
        return self.verdicts[key][0]

    def next_base(self, current: dict) -> dict:
        """The fastest config faster than `current` that passes the reference check (so a fast but wrong
        setting, say 16-bit operands that miss the tolerance, never becomes the base of the next round),
        else `current`."""
        for ms, _, config in self.ranked()[:MAX_VERIFY]:
            if ms >= self.ms(current):
                break
            if self.passes(config):
                return config
        return current

    def search(self, default: dict) -> None:
        self.attempt(default, always=True)
        current = default
        seeds = seeds_of(self.task, default, self.space)
        if seeds:
            if self.compiler is not None:
                self.compiler.request(self.task, seeds, self.priority)
            for config in seeds:  # like the default, whatever the budget: a few configs, compiled ahead
                self.attempt(config, always=True)
            current = self.next_base(current)
        self.explore(current)

    def resume(self, default: dict, deadline: float, bar) -> None:
        """Goes on with a search its deadline stopped, until `deadline`: rounds of moves from the fastest config
        that passes the check, leaving out what was timed before."""
        self.deadline, self.bar = deadline, bar
        self.wait_credit = max(0.0, deadline - self.clock())
        self.result.unexplored = 0
        self.explore(self.next_base(default))

    def explore(self, current: dict) -> None:
        """Rounds of one-key moves from `current`, each from the fastest config so far, until a round finds
        nothing faster, MAX_ROUNDS, or the deadline (the moves left untimed are counted as unexplored)."""
        for _ in range(MAX_ROUNDS):
            moves = [c for c in self.space.moves(current) if config_key(c) not in self.seen]
            if not moves:
                return
            self.result.rounds += 1
            if self.compiler is not None:
                self.compiler.request(self.task, moves, self.priority)
            if self.bar is not None:
                self.bar.total += len(moves)
                self.bar.refresh()
            for number, config in enumerate(moves):
                if not self.attempt(config):
                    self.result.unexplored += len(moves) - number
                    return
            moved = [(self.ms(c), c) for c in moves if config_key(c) in self.timed]
            combined = _combined(current, self.ms(current), moved, self.space)
            if combined is not None and config_key(combined) not in self.seen:
                if self.compiler is not None:
                    self.compiler.request(self.task, [combined], self.priority)
                if not self.attempt(combined):
                    self.result.unexplored += 1
                    return
            base = self.next_base(current)
            if base is current:
                return
            current = base

    def choose(self, default: dict) -> None:
        """Re-times the fastest few (and the default) precisely and writes the fastest that passes the check
        into the result (the default when none of the first MAX_VERIFY does)."""
        result = self.result
        finalists = self.ranked()[:FINALISTS]
        if all(order != 0 for _, order, _ in finalists) and config_key(default) in self.timed:
            finalists.append(self.timed[config_key(default)])
        precise = []
        # finalists are compiled (timed once already): the compile workers can wait (precompile.Precompiler.paused)
        with self.compiler.paused() if self.compiler is not None else contextlib.nullcontext():
            for ms, order, config in finalists:
                try:
                    precise.append((float(self.measure(self.task, config, precise=True)), order, config))
                except SweepAborted:
                    raise
                except ConfigCrashed as exc:
                    self.crash(config, exc, "precise timing")
                    continue
                except Exception:  # noqa: BLE001 -- the quick time stands
                    precise.append((ms, order, config))
                if order == 0:
                    result.default_ms = precise[-1][0]
        precise.sort(key=lambda item: (item[0], item[1]))
        candidates = precise + [t for t in self.ranked() if all(t[1] != p[1] for p in precise)]
        attempts = candidates[:MAX_VERIFY]
        if all(order != 0 for _, order, _ in attempts):
            attempts += [c for c in candidates if c[1] == 0]
        if result.config is not None:  # a resumed search: its first winner stays a candidate
            attempts += [c for c in candidates if c[2] == result.config and c not in attempts]
        for ms, _, config in attempts:
            if self.passes(config):
                result.config, result.ms, result.verified = config, ms, self.verdicts[config_key(config)][1]
                return
        result.error = "no timed config passed the reference check" + (
            f" ({result.errors[-1]})" if result.errors else "")


def run_task(task: Task, *, measure, verify, deadline: float, clock=time.monotonic, progress=None, compiler=None,
             priority: int = 0, stopped: list | None = None) -> TaskResult:
    """Searches one task until `deadline` (the default is always timed; waiting for compiles moves the deadline,
    at most by the time it was given) and picks a verified winner.
    `compiler` (optional) compiles configs ahead: `request(task, configs, priority)` queues them, and
    `wait(task, config, timeout) -> bool` says whether one is ready (False: not within `timeout`), and the
    context manager `paused()` holds the compiles back while the finalists are re-timed.
    `stopped` (optional): where (search, default) goes when the deadline stopped the search (`resume_task`)."""
    result = TaskResult(task)
    try:
        default, space = start_of(task)
    except Exception as exc:  # noqa: BLE001
        result.error = f"tuning_space/default_config failed: {_short(exc)}"
        return result
    result.space, result.default_config = len(space), default
    bar = progress(total=1, desc=task.label) if progress else None
    search = _Search(task, result, space, measure=measure, verify=verify, deadline=deadline, clock=clock,
                     compiler=compiler, priority=priority, bar=bar)
    try:
        search.search(default)
    finally:
        if bar is not None:
            bar.close()
    if not search.timed:
        problems = result.errors + result.crashes
        result.error = "no config ran" + (f" (e.g. {problems[0]})" if problems else "")
        return result
    search.choose(default)
    if stopped is not None and result.unexplored:
        stopped.append((search, default))
    return result


def resume_task(search: _Search, default: dict, *, deadline: float, progress=None) -> TaskResult:
    """Goes on with a task its deadline stopped (run_task's `stopped`) until `deadline`, then picks the winner
    again, among every config timed in both runs."""
    bar = progress(total=1, desc=f"{search.task.label} (resumed)") if progress else None
    try:
        search.resume(default, deadline, bar)
    finally:
        if bar is not None:
            bar.close()
    search.choose(default)
    return search.result


def sweep(tasks: list[Task], *, measure, verify, budget_seconds: float, on_result=None, clock=time.monotonic,
          progress=None, log=None, compiler=None) -> SweepReport:
    """Runs every task within the budget, shared out in proportion to the size of each task's first round (a
    backward phase has more stages, so more moves and more kernels to compile, than its forward); time a task
    leaves unused goes to the rest. Time left after the last task goes back, in equal shares and task order, to
    the tasks their deadline stopped: a task's share is fixed when it starts, so a task stopped early never had
    the time that converging tasks after it left (session 15: a sweep of 8 TileLang tasks with a 480 s budget
    ended after 228 s, with sla_gla's forward at 4x8192 stopped by its deadline, 8 moves untimed).
    `on_result(result)` is called after each task (the CLI writes the table there). With a `compiler`, the
    first round of every task is queued at once, in task order, so compiling runs ahead of timing."""
    start = clock()
    results: list[TaskResult] = []
    aborted = None
    stopped: list = []  # (search, default) of the tasks their deadline stopped
    weights = []
    for number, task in enumerate(tasks):
        try:
            first = first_round(task)
        except Exception:  # noqa: BLE001 -- run_task reports a broken tuning space
            first = []
        weights.append(max(len(first), 1))
        if compiler is not None and first:
            compiler.request(task, first, number)
    for number, task in enumerate(tasks):
        remaining = budget_seconds - (clock() - start)
        share = max(remaining, 0.0) * weights[number] / sum(weights[number:])
        # leave a fifth of the share for the precise re-timing and the reference check
        deadline = clock() + 0.8 * share
        try:
            result = run_task(task, measure=measure, verify=verify, deadline=deadline, clock=clock,
                              progress=progress, compiler=compiler, priority=number, stopped=stopped)
        except (SweepAborted, SweepStopped) as exc:
            aborted = f"{exc} ({len(tasks) - number - 1} later task(s) not run)"
            results.append(TaskResult(task, error=f"stopped: {exc}"))
            break
        results.append(result)
        _report(result, log, on_result)
    # as many as get MIN_RESUME_S each, the earliest first
    resumed = [] if aborted else stopped[:int(max(budget_seconds - (clock() - start), 0.0) // MIN_RESUME_S)]
    for number, (search, default) in enumerate(resumed):
        remaining = budget_seconds - (clock() - start)
        deadline = clock() + 0.8 * max(remaining, 0.0) / (len(resumed) - number)
        try:
            result = resume_task(search, default, deadline=deadline, progress=progress)
        except (SweepAborted, SweepStopped) as exc:
            aborted = f"{exc} (while resuming {search.task.label}, whose first result stands)"
            break
        _report(result, log, on_result, resumed=True)
    return SweepReport(results, clock() - start, aborted)


def _report(result: TaskResult, log, on_result, resumed: bool = False) -> None:
    if log is not None:
        log(f"{result.task.label}{' (resumed)' if resumed else ''}: "
            + (f"{result.ms:.3f} ms [{config_label(result.config)}]" if result.config
               else f"not written: {result.error}"))
    if on_result is not None:
        on_result(result)


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
