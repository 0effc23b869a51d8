"""Backends that run a spec's recurrence. Each module exposes `build(spec) -> forward`, where
`forward(q, k, v, *, g, beta, gq, gk, scale, initial_state, output_final_state, cu_seqlens)` returns
(o, final_state) and is differentiable; arguments arrive already validated.
"""

from __future__ import annotations

import importlib

BACKENDS = ("reference", "triton", "tilelang")


def build_backend(name: str, spec):
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} or auto, got {name!r}")
    return importlib.import_module(f"sla_dsl.backends.{name}").build(spec)
