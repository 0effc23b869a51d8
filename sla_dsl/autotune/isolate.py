"""The sweep's timings and reference checks in a worker process that a crashing config may kill.

A config can do worse than raise: an illegal memory access leaves its process's CUDA context unusable (every
later launch fails), a compiler or driver bug can kill the process, a bad schedule can hang. `IsolatedDevice`
gives `sweep` a `measure` and a `verify` that send each request to one persistent worker process (spawned,
so it shares no CUDA state with the sweep), which answers with the time, the reference check's verdict, or
the error (type, message, and whether it is skippable). When the error is fatal to the CUDA context
(`sweep.is_fatal`, or the worker's device check fails after an error), the worker dies, or it gives no answer
within `timeout_s`, the worker is killed, the request raises `ConfigCrashed` (the sweep counts the config as
crashed) and the next request starts a fresh worker. When no worker can be started, or MAX_CRASHES_IN_A_ROW
requests in a row crash one (the device itself looks unusable), it raises `SweepAborted` (the sweep stops).

What the worker runs is `work`, a picklable object (runner.DeviceWork for the CLI):

    work.build(backend, spec) -> kernels          once per backend and spec in a worker
    work.measure(task, config, precise) -> ms     `task`: a sweep Task holding the worker's kernels
    work.verify(task, config) -> (passed, errors)
    work.check()                                  after an error: raises if the device is no longer usable
"""

from __future__ import annotations

import multiprocessing
import os
import signal

from sla_dsl.autotune.sweep import ConfigCrashed, RemoteError, SweepAborted, Task, is_fatal, is_skippable

DEFAULT_TIMEOUT_S = 120.0  # one request, a first compile included
START_TIMEOUT_S = 300.0  # a worker's start (imports) until it is ready
MAX_CRASHES_IN_A_ROW = 8
_MAX_MESSAGE = 4000


def _fatal(work, exc: BaseException) -> bool:
    if is_fatal(exc):
        return True
    try:
        work.check()
    except Exception:  # noqa: BLE001 -- the error left the device unusable
        return True
    return False


def serve(conn, work) -> None:
    """The worker process: answers (kind, backend, spec, shape, phase, config, precise) requests, kind 'measure'
    or 'verify', with ('ok', result) or ('error', type name, message, fatal, skippable), until None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the sweep, which ends its worker
    kernels: dict[tuple, object] = {}
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        kind, backend, spec, shape, phase, config, precise = request
        try:
            key = (backend, spec.name, spec.source_sha256)
            if key not in kernels:
                kernels[key] = work.build(backend, spec)
            task = Task(kernels[key], spec, backend, shape, phase)
            answer = ("ok", float(work.measure(task, config, precise)) if kind == "measure"
                      else work.verify(task, config))
        except Exception as exc:  # noqa: BLE001 -- reported to the sweep, which classifies it
            answer = ("error", type(exc).__name__, str(exc)[:_MAX_MESSAGE], _fatal(work, exc), is_skippable(exc))
        conn.send(answer)


def describe_exit(exitcode: int | None) -> str:
    """How a process ended, from multiprocessing's exit code."""
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class IsolatedDevice:
    """`measure(task, config, precise)` and `verify(task, config)` for `sweep`, run by `work` in a worker
    process (see the module docstring). `close()` ends the worker. `start_method` "spawn" starts the worker
    without anything of this process (its CUDA state above all); tests may fork."""

    def __init__(self, work, *, timeout_s: float = DEFAULT_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S,
                 start_method: str = "spawn"):
        self.work, self.timeout_s, self.start_timeout_s = work, timeout_s, start_timeout_s
        self._context = multiprocessing.get_context(start_method)
        self._process = self._conn = None
        self.started = 0  # worker processes started
        self.crashes = 0  # requests that crashed their worker
        self._in_a_row = 0

    def measure(self, task, config: dict, precise: bool = False) -> float:
        return self._request("measure", task, config, precise)

    def verify(self, task, config: dict) -> tuple[bool, dict]:
        return self._request("verify", task, config, False)

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        # daemon: ended with the sweep even if it never reaches close()
        process = self._context.Process(target=serve, args=(child, self.work), name="sla_dsl-autotune-worker",
                                        daemon=True)
        try:
            process.start()
        except Exception as exc:  # noqa: BLE001 -- e.g. `work` does not pickle
            parent.close()
            raise SweepAborted(f"cannot start a worker process: {type(exc).__name__}: {exc}") from exc
        finally:
            child.close()
        self._process, self._conn = process, parent
        self.started += 1
        try:
            ready = parent.poll(self.start_timeout_s)
            if ready:
                parent.recv()
        except (EOFError, OSError):
            raise SweepAborted(f"the worker process exited before it was ready ({self._stop(wait=5.0)}; its "
                               f"error, if any, is printed above)") from None
        if not ready:
            self._stop()
            raise SweepAborted(f"the worker process was not ready within {self.start_timeout_s:g} s")

    def _stop(self, wait: float = 0.0) -> str:
        """Ends the worker (killed: its CUDA context may be unusable, or it hangs); says how it ended."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is None:
            return "not running"
        process.join(wait)  # one that is dying by itself: its exit code
        if process.is_alive():
            process.kill()
            process.join(10.0)
        conn.close()
        return describe_exit(process.exitcode)

    def _crashed(self, message: str) -> Exception:
        self.crashes += 1
        self._in_a_row += 1
        if self._in_a_row >= MAX_CRASHES_IN_A_ROW:
            return SweepAborted(f"{self._in_a_row} requests in a row crashed the worker process, the device "
                                f"looks unusable (the last one {message})")
        return ConfigCrashed(message)

    def _request(self, kind: str, task, config: dict, precise: bool):
        if self._process is not None and not self._process.is_alive():
            self._stop()  # died between requests: not the next config's doing
        if self._process is None:
            self._start()
        conn = self._conn
        try:
            conn.send((kind, task.backend, task.spec, task.shape, task.phase, dict(config), precise))
            answer = conn.recv() if conn.poll(self.timeout_s) else None
        except (EOFError, OSError):  # the worker died: end of file, a broken pipe or a reset connection
            raise self._crashed(f"crashed the worker process ({self._stop(wait=5.0)})") from None
        if answer is None:
            self._stop()
            raise self._crashed(f"hung: no answer within {self.timeout_s:g} s")
        if answer[0] == "ok":
            self._in_a_row = 0
            return answer[1]
        _, type_name, message, fatal, skippable = answer
        if fatal:
            self._stop()
            first = (message.strip().splitlines() or [""])[0][:300]
            raise self._crashed(f"crashed the CUDA context: {type_name}: {first}")
        self._in_a_row = 0
        raise RemoteError(type_name, message, skippable)

    def summary(self) -> str:
        return (f"timing worker: {self.started} process(es) started, {self.crashes} crash(es) "
                f"(each crashing config was counted and its worker replaced)")

    def close(self) -> None:
        """Ends the worker: asks it to exit, kills it if it does not."""
        if self._process is None:
            return
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._stop(wait=5.0)
