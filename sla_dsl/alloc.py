"""Output allocation for kernels. Under `poisoned_outputs()` every output starts NaN-filled, so a test
catches any element a kernel forgot to write."""

from __future__ import annotations

import contextlib

import torch

_poison = False


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_outputs():
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous
