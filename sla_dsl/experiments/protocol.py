"""--seeds-at-best-lr: Zoology's learning-rate protocol as two stages of one grid.

Stage 1 (the sweep) runs every learning rate at the first (lowest) seed of each cell, a cell being a (setting,
spec) as the report groups runs. Stage 2 runs the other seeds only at the learning rate the report selects for
the cell from the results file's stage-1 runs (`report.select_cells`, so the command and the report cannot
disagree on the winner). Stage 2 is decided from the file alone, so every process that reads the same file after
stage 1 derives the same list.
"""

from __future__ import annotations

from sla_dsl.experiments import results
from sla_dsl.experiments.grid import Run
from sla_dsl.experiments.report import select_cells, setting_of


def cell_of(run: Run) -> tuple:
    """The (setting, spec) the report selects a learning rate for."""
    return setting_of({"config": run.to_dict()}), run.spec


def sweep_runs(runs: list[Run]) -> list[Run]:
    """Stage 1: the runs at the lowest seed of their cell, every learning rate."""
    first_seed: dict[tuple, int] = {}
    for run in runs:
        cell = cell_of(run)
        first_seed[cell] = min(run.seed, first_seed.get(cell, run.seed))
    return [run for run in runs if run.seed == first_seed[cell_of(run)]]


def later_seed_count(runs: list[Run]) -> int:
    """How many runs stage 2 will have: one per (cell, later seed), whichever learning rate wins."""
    sweep = {run.key() for run in sweep_runs(runs)}
    return len({(cell_of(run), run.seed) for run in runs if run.key() not in sweep})


def missing_sweep_runs(runs: list[Run], records: list[dict]) -> list[Run]:
    """Stage-1 runs not yet in `records`; stage 2 waits for none of them to be missing."""
    done = results.finished_keys(records)
    return [run for run in sweep_runs(runs) if run.key() not in done]


def best_lr_runs(runs: list[Run], records: list[dict]) -> list[Run]:
    """Stage 2: the runs at a later seed whose learning rate is the one the report selects for their cell from
    the stage-1 runs in `records` (in grid order; cells without a recorded stage-1 run get none)."""
    sweep = {run.key() for run in sweep_runs(runs)}
    swept = [record for record in records if Run.from_dict(record["config"]).key() in sweep]
    best_lr = {(cell.setting, cell.spec): cell.lr for cell in select_cells(swept)}
    return [run for run in runs if run.key() not in sweep and best_lr.get(cell_of(run)) == run.lr]
