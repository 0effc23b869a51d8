"""`experiment report`: results files -> a markdown report (report.md) and plots (PNG) in one folder.

Selection (Zoology-style): for every setting (a run's config without spec, lr and seed) and spec, the learning
rate with the best mean accuracy over the seeds that every learning rate ran (all seeds where they share none) is
chosen, on the scored accuracy (MQAR: the test set; needle: the training lengths, never the extrapolation
lengths). Cells show mean ± half the range over all seeds run at that learning rate, and the seed count. An SLA
spec is paired with the baseline named like it without the `sla_` prefix (sla_gla with gla); Δ is SLA minus
baseline.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path

from sla_dsl.experiments import results as results_file
from sla_dsl.experiments.diagnostics import failure_signs
from sla_dsl.experiments.grid import Run

NOT_SETTING = ("spec", "lr", "seed")


@dataclasses.dataclass
class Cell:
    """One (setting, spec) at its selected learning rate: the records of its seeds."""

    setting: tuple  # sorted (field, value) pairs of the config without NOT_SETTING
    spec: str
    lr: float
    records: list
    learning_rates: int  # how many were tried

    @property
    def backbone(self) -> str:
        return self.spec.removeprefix("sla_")

    @property
    def sla(self) -> bool:
        return self.spec.startswith("sla_")

    def field(self, name: str):
        return dict(self.setting)[name]

    def stat(self, read) -> tuple[float, float, int] | None:
        """(mean, half range, n) of read(record) over the seeds; None if no value."""
        values = [v for v in (read(r) for r in self.records) if v is not None]
        if not values:
            return None
        return sum(values) / len(values), (max(values) - min(values)) / 2, len(values)


def load_records(paths: list[Path]) -> list[dict]:
    """Records of all files; a run present in several files counts once (the last file's record)."""
    by_key = {}
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"--results: {path} does not exist")
        for record in results_file.load(path):
            by_key[Run.from_dict(record["config"]).key()] = record
    return list(by_key.values())


def setting_of(record: dict) -> tuple:
    return tuple(sorted((k, _hashable(v)) for k, v in record["config"].items() if k not in NOT_SETTING))


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def select_cells(records: list[dict]) -> list[Cell]:
    groups: dict[tuple, dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        groups[(setting_of(record), record["config"]["spec"])][record["config"]["lr"]].append(record)
    cells = []
    for (setting, spec), by_lr in groups.items():
        # Learning rates are compared on the seeds every one of them ran: a second seed run only at the first
        # sweep's winner would otherwise pull its mean down against single-seed rivals (seed spread is large)
        shared = set.intersection(*({r["config"]["seed"] for r in runs} for runs in by_lr.values()))

        def mean_accuracy(lr):
            values = [r["accuracy"] for r in by_lr[lr] if r["accuracy"] is not None
                      and (not shared or r["config"]["seed"] in shared)]
            return sum(values) / len(values) if values else -math.inf
        best = max(sorted(by_lr), key=mean_accuracy)  # sorted: ties go to the smallest learning rate
        cells.append(Cell(setting, spec, best, sorted(by_lr[best], key=lambda r: r["config"]["seed"]), len(by_lr)))
    cells.sort(key=lambda c: (sort_key(c.setting), c.backbone, c.sla))
    return cells


def sort_key(setting: tuple) -> tuple:
    """Settings of both tasks in one order: a field one task leaves None sorts before any value."""
    return tuple((name, value is not None, value if value is not None else 0) for name, value in setting)


def pairs(cells: list[Cell]) -> list[tuple[Cell | None, Cell | None]]:
    """(baseline, SLA) per setting and backbone; either may be missing."""
    found: dict[tuple, list] = {}
    for cell in cells:
        found.setdefault((cell.setting, cell.backbone), [None, None])[cell.sla] = cell
    return [tuple(pair) for pair in found.values()]


def fmt_stat(stat) -> str:
    if stat is None:
        return "-"
    mean, spread, n = stat
    return f"{mean:.3f} ± {spread:.3f} ({n})"


def fmt_delta(base, sla) -> str:
    if base is None or sla is None:
        return "-"
    return f"{sla[0] - base[0]:+.3f}"


def accuracy(record):
    return record["accuracy"]


def cell_accuracy(length, depth=None, metric="accuracy"):
    """Reader of a needle record's accuracy (exact match; metric "token_accuracy": per value token) at one length
    (one depth, or the mean over depths)."""
    def read(record):
        rows = [c for c in record["metrics"]["cells"] if c["length"] == length and (depth is None or c["depth"] == depth)]
        return sum(c[metric] for c in rows) / len(rows) if rows else None
    return read


def _lr_text(base, sla) -> str:
    return " / ".join("-" if c is None else f"{c.lr:g}" for c in (base, sla))


def mqar_lines(cells: list[Cell]) -> list[str]:
    lines = ["## MQAR: accuracy on the query positions", "",
             "| T | kv pairs | width | heads | backbone | baseline | SLA | Δ | lr (base / SLA) | steps |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---|---:|"]
    for base, sla in pairs([c for c in cells if c.field("task") == "mqar"]):
        any_cell = base or sla
        f = any_cell.field
        b, s = (c.stat(accuracy) if c else None for c in (base, sla))
        lines.append(f"| {f('seq_len')} | {f('kv_pairs')} | {f('width')} | {f('heads')} | {any_cell.backbone} | "
                     f"{fmt_stat(b)} | {fmt_stat(s)} | {fmt_delta(b, s)} | {_lr_text(base, sla)} | {f('steps')} |")
    return lines + [""]


NEEDLE_METRICS = {"accuracy": "exact match of the whole value",
                  "token_accuracy": "accuracy per value token (teacher forced; 1/16 is chance)"}


def needle_lines(cells: list[Cell], metric: str = "accuracy") -> list[str]:
    needle = [c for c in cells if c.field("task") == "niah"]
    lengths = sorted({length for c in needle for length in c.field("eval_lens")})
    head = "| backbone | width | heads | train T | " + " | ".join(f"T={n} base / SLA" for n in lengths) + \
        " | lr (base / SLA) | seeds (base / SLA) |"
    lines = [f"## Needle in a haystack: {NEEDLE_METRICS[metric]} (mean over depths)", "",
             "Lengths beyond the training lengths are extrapolation. Cells are mean±half range over the seeds.", "",
             head, "|---|---:|---:|---|" + "---|" * len(lengths) + "---|---|"]
    for base, sla in pairs(needle):
        any_cell = base or sla
        f = any_cell.field
        cols = []
        for length in lengths:
            b, s = (c.stat(cell_accuracy(length, metric=metric)) if c else None for c in (base, sla))
            cols.append(f"{_short(b)} / {_short(s)} ({fmt_delta(b, s)})")
        lines.append(f"| {any_cell.backbone} | {f('width')} | {f('heads')} | {','.join(map(str, f('train_lens')))} | "
                     + " | ".join(cols) + f" | {_lr_text(base, sla)} | {_seeds_text(base, sla)} |")
    return lines + [""]


def _short(stat) -> str:
    return "-" if stat is None else f"{stat[0]:.2f}±{stat[1]:.2f}"


def _seeds_text(base, sla) -> str:
    return " / ".join("-" if c is None else str(len(c.records)) for c in (base, sla))


def gate_lines(cells: list[Cell]) -> list[str]:
    lines = ["## SLA gate diagnostics (selected learning rate, mean over layers and seeds)", "",
             "Entropy over heads as a fraction of log H (1 = uniform, 0 = one-hot; the paper's failure sign is "
             "> 0.9) and Frobenius norms of W_GQ / W_GK (failure sign: collapsing to 0).", "",
             "| task | setting | spec | G^Q entropy | G^K entropy | norm W_GQ | norm W_GK | failure signs |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for cell in cells:
        rows = [row for record in cell.records for row in record.get("gates") or []]
        if not rows:
            continue
        def mean(key):
            values = [row[key] for row in rows if row[key] is not None]
            return "-" if not values else f"{sum(values) / len(values):.3f}"
        lines.append(f"| {cell.field('task')} | {_setting_text(cell)} | {cell.spec} | {mean('read_entropy_fraction')} | "
                     f"{mean('write_entropy_fraction')} | {mean('read_weight_norm')} | {mean('write_weight_norm')} | "
                     f"{_signs_text(rows)} |")
    return lines + [""]


def _signs_text(rows: list[dict]) -> str:
    """How many of the layers (of all seeds) show each failure sign, e.g. 'G^Q near uniform 3/4'."""
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        for sign in failure_signs(row):
            counts[sign] += 1
    return "; ".join(f"{sign} {n}/{len(rows)}" for sign, n in sorted(counts.items())) or "none"


def _setting_text(cell: Cell) -> str:
    f = cell.field
    if f("task") == "mqar":
        return f"T={f('seq_len')} kv={f('kv_pairs')} d={f('width')} H={f('heads')}"
    return f"T={','.join(map(str, f('train_lens')))} d={f('width')} H={f('heads')}"


def sweep_lines(records: list[dict]) -> list[str]:
    """Every learning rate tried: the data behind the selection."""
    groups: dict[tuple, list] = defaultdict(list)
    for record in records:
        groups[(setting_of(record), record["config"]["spec"], record["config"]["lr"])].append(record)
    lines = ["## All runs by learning rate", "",
             "| task | setting | spec | lr | accuracy | train loss | diverged | s / run |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for (setting, spec, lr), rows in sorted(groups.items(), key=lambda item: (sort_key(item[0][0]), *item[0][1:])):
        cell = Cell(setting, spec, lr, rows, 1)
        loss = cell.stat(lambda r: r["train_loss"])
        wall = cell.stat(lambda r: r["timing"]["wall_s"])
        lines.append(f"| {cell.field('task')} | {_setting_text(cell)} | {spec} | {lr:g} | {fmt_stat(cell.stat(accuracy))} "
                     f"| {'-' if loss is None else f'{loss[0]:.3f}'} | {sum(r['diverged'] for r in rows)} | "
                     f"{wall[0]:.1f} |")
    return lines + [""]


def environment_lines(records: list[dict], paths: list[Path]) -> list[str]:
    devices = sorted({r.get("device", "?") for r in records})
    backends = sorted({r.get("backend", "?") for r in records})
    versions = sorted({json.dumps(r.get("versions", {}), sort_keys=True) for r in records})
    dates = sorted(r.get("date", "?") for r in records)
    return ["# SLA gates and in-context retrieval: results", "",
            f"- results: {', '.join(str(p) for p in paths)} ({len(records)} runs)",
            f"- device: {', '.join(devices)}; backend: {', '.join(backends)}",
            f"- versions: {'; '.join(versions)}",
            f"- dates: {dates[0]} .. {dates[-1]}" if dates else "- dates: -",
            "- selection: per setting and spec, the learning rate with the best mean accuracy over seeds; "
            "cells are mean ± half-range (seeds)", ""]


def write_report(paths: list[Path], out: Path) -> list[Path]:
    """Writes report.md and the plots into `out`; returns the files written."""
    records = load_records(paths)
    if not records:
        raise ValueError(f"--results: no runs in {', '.join(map(str, paths))}")
    from sla_dsl.experiments.plots import write_plots

    from sla_dsl.autotune.table import write_atomically

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = select_cells(records)
    tasks = {c.field("task") for c in cells}
    lines = environment_lines(records, paths)
    if "mqar" in tasks:
        lines += mqar_lines(cells)
    if "niah" in tasks:
        lines += needle_lines(cells) + needle_lines(cells, "token_accuracy")
    lines += gate_lines(cells) + sweep_lines(records)
    plots = write_plots(cells, out)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    report = out / "report.md"
    write_atomically(report, "\n".join(lines))
    return [report, *plots]
