"""Checkpoint files of a training run: `<dir>/step-<step>.pt`, written to a temporary file and renamed (a
crash never leaves a torn checkpoint), the newest `keep` kept."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def _steps(directory: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(directory: Path | str, step: int, payload: dict, keep: int = 2) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)
    for _, old in _steps(directory)[:-keep]:
        old.unlink()
    return path


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint file, or the newest one in a directory. Raises FileNotFoundError naming what is missing."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = _steps(path)
        if found:
            return found[-1][1]
        raise FileNotFoundError(f"resume: no checkpoint (step-<N>.pt) in {path}")
    raise FileNotFoundError(f"resume: {path} is neither a checkpoint file nor a directory")


def load_checkpoint(path: Path | str) -> dict:
    # The payload is tensors and plain containers of numbers and strings: the safe loader reads it.
    return torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=True)
