"""The eager PyTorch backend: the chunkwise reference, differentiable by autograd, on any device."""

from __future__ import annotations

import functools

from sla_dsl.reference import reference_forward


def build(spec):
    return functools.partial(reference_forward, spec.recurrence, form="chunkwise", chunk_size=64)
