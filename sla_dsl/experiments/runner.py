"""Runs a grid: skips the runs already in the results file, trains the others in order, appends each finished
run to the file, and stops cleanly when the time budget would be exceeded.

Budget: before a run starts, its duration is estimated from the runs of this session (the mean of earlier runs
of the same model; for a new model, the mean of the first runs of the other models, which include building
kernels and compiling). A run that would end past the budget is not started; one that is overtaken by the
budget anyway is abandoned (nothing of it recorded). Either way the command prints what finished and what is
left, and exits 0: running it again resumes.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from sla_dsl.autotune.table import utc_now, versions
from sla_dsl.experiments import results
from sla_dsl.experiments.grid import Run
from sla_dsl.experiments.training import BudgetExhausted, ModelPool, train_and_evaluate
from sla_dsl.ops import SpecOp

RECOMPILE_LIMIT = 256  # compiled graphs per code object: every model and shape of a grid shares the forward code


def environment(specs: dict, device: torch.device, backend: str) -> dict:
    """Where the runs ran: device, the backend `backend` resolves to there, package versions."""
    chosen = SpecOp(next(iter(specs.values())), backend).backend_for(device)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "backend": chosen, "versions": versions()}


def run_grid(runs: list[Run], specs: dict, out: Path, *, device: torch.device, backend: str = "auto",
             compile_models: bool = False, budget_minutes: float | None = None, progress: bool = True,
             log=print) -> dict:
    """Returns {"finished": n, "skipped": n (already in the file), "left": n, "stopped": reason or None}."""
    started = time.monotonic()
    deadline = started + budget_minutes * 60 if budget_minutes else math.inf
    done = results.finished_keys(results.load(out))
    pending = [run for run in runs if run.key() not in done]
    log(f"{len(runs)} run(s) in the grid, {len(runs) - len(pending)} already in {out}, {len(pending)} to run on "
        f"{device}" + (f" within {budget_minutes:g} min" if budget_minutes else ""))
    if compile_models:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    env = environment(specs, device, backend)
    pool = ModelPool(specs, device, backend, compile_models)
    durations: dict[tuple, list[float]] = {}
    bar_factory = _bars() if progress else None
    outer = bar_factory(total=len(pending), desc="runs", position=0) if bar_factory else None
    finished, stopped = 0, None
    for run in pending:
        estimate = _estimate(durations, run.model_key())
        if time.monotonic() + estimate > deadline:
            stopped = (f"budget: the next run ({run.label()}) would take ~{estimate:.0f} s, "
                       f"{max(0.0, deadline - time.monotonic()):.0f} s are left")
            break
        steps_bar = (lambda total, run=run: bar_factory(total=total, desc=run.label(), position=1, leave=False)) \
            if bar_factory else None
        try:
            measured = train_and_evaluate(run, pool, deadline, steps_bar)
        except BudgetExhausted as exc:
            stopped = f"budget: {exc} (abandoned, not recorded)"
            break
        durations.setdefault(run.model_key(), []).append(measured["timing"]["wall_s"])
        spec = specs[run.spec]
        record = {"config": run.to_dict(), "spec_sha256": spec.source_sha256,
                  "sla": spec.recurrence.gates.value != "none", **measured, **env, "date": utc_now()}
        results.append(out, record)
        finished += 1
        extra = record["metrics"].get("extrapolation_accuracy")
        log(f"done {run.label()}: accuracy {record['accuracy']:.3f}"
            + (f", extrapolation {extra:.3f}" if extra is not None else "")
            + f", loss {_fmt(record['loss'])}, {record['timing']['wall_s']:.1f} s"
            + f" ({record['timing']['steps_per_s']:.1f} steps/s" + (", compiled" if record["compiled"] else "")
            + (", DIVERGED" if record["diverged"] else "") + ")")
        if outer is not None:
            outer.update(1)
    if outer is not None:
        outer.close()
    left = len(pending) - finished
    log(f"finished {finished} run(s) in {time.monotonic() - started:.0f} s; {left} left"
        + (f"; stopped by the {stopped}" if stopped else "") + f"; results in {out}")
    return {"finished": finished, "skipped": len(runs) - len(pending), "left": left, "stopped": stopped}


def _estimate(durations: dict, model_key: tuple) -> float:
    same = durations.get(model_key)
    if same:
        return sum(same) / len(same)
    firsts = [times[0] for times in durations.values()]
    return sum(firsts) / len(firsts) if firsts else 0.0


def _bars():
    from tqdm import tqdm

    return lambda **kw: tqdm(dynamic_ncols=True, file=sys.stderr, **kw)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"

