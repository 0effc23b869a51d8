"""The results file: {"runs": [record, ...]}, one record per finished run, rewritten whole and atomically
after each run under a lock (a crash leaves the previous file, never a torn one; processes sharing it take
turns). A record's "config" is its `Run`; runs whose config is already in the file are finished and skipped
when a grid is run again."""

from __future__ import annotations

import json
from pathlib import Path

from sla_dsl.experiments.grid import Run


class ResultsError(ValueError):
    pass


def load(path: Path) -> list[dict]:
    """The records in `path`; none if it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON ({exc}); move it away or pass another --out") from exc
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ResultsError(f'{path}: expected an object {{"runs": [...]}} written by `sla_dsl experiment`')
    for i, record in enumerate(data["runs"]):
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise ResultsError(f"{path}: run {i} has no config object")
    return data["runs"]


def finished_keys(records: list[dict]) -> set[str]:
    return {Run.from_dict(record["config"]).key() for record in records}


def append(path: Path, record: dict) -> None:
    """Adds `record` to the file; processes appending to one file at once (--workers) take turns by a lock file."""
    from sla_dsl.autotune.table import file_lock, write_atomically

    with file_lock(Path(path)):
        records = load(path)
        records.append(record)
        write_atomically(Path(path), json.dumps({"runs": records}, indent=1, sort_keys=True, allow_nan=False) + "\n")
