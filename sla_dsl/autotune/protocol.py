"""The tuning protocol between the tuner and a backend's kernels object (what `build(spec)` returns).

A tunable kernels object provides

    kernels.tuning_space(shape[, phase]) -> Space | list[dict]   every valid config for `shape` (a `Shape`), for
                                                                   phase 'fwd' or 'bwd' when it takes `phase`
    kernels.default_config(shape[, phase]) -> dict                the heuristic choice (must be in the space)
    kernels.forward(..., config=None)                             None: resolve_config(); else run exactly `config`
    kernels.backward(..., config=None)

and optionally

    kernels.precompile(shape, phase, config)    compiles every kernel `config` needs for calls of this shape's
                                                H, K, V and dtype without launching any (the sweep runs it in
                                                worker processes ahead of timing; their on-disk caches serve
                                                the sweeping process)

Config values are JSON scalars (int, float, str, bool); keys are the backend's own (e.g. chunk_size,
block_v, num_warps, num_stages, and schedule choices). A `Space` (sla_dsl.autotune.space) is a product of the
spaces that kernel templates declare; a plain list is a space of those configs. A config that cannot compile
or does not fit the GPU may raise anything when run; raising `ConfigRejected` says so explicitly (counted
as skipped).

At call time a backend does

    from sla_dsl.autotune import Shape, resolve_config
    cfg = resolve_config(self, self.spec, "triton", Shape.of(q, v, cu_seqlens), "fwd", config)

which returns `config` when given, else the tuned table's entry for the nearest bucket (if it is valid for
this shape), else `default_config(shape)`. Resolution is cached per (kernels, shape, phase).
"""

from __future__ import annotations

import inspect

from sla_dsl.autotune.shapes import Shape
from sla_dsl.autotune.space import Space
from sla_dsl.autotune.table import lookup


class ConfigRejected(RuntimeError):
    """Raised by a backend for a config it cannot build for a shape (too much shared memory, bad tiling)."""


def _takes_phase(method) -> bool:
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "phase" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def is_tunable(kernels) -> bool:
    return all(callable(getattr(kernels, name, None)) for name in ("tuning_space", "default_config"))


def tuning_space(kernels, shape: Shape, phase: str) -> Space:
    method = kernels.tuning_space
    return Space.of(method(shape, phase=phase) if _takes_phase(method) else method(shape))


def default_config(kernels, shape: Shape, phase: str) -> dict:
    """kernels.default_config, cached per (kernels, shape, phase) like resolve_config: a call with a config
    (every timing of a sweep) fills the rest from it, and the TileLang heuristic, which sizes shared memory for
    every chunk and block_v, took 0.45 ms of CPU per evaluation. Three per call made the sweep's timings of
    sub-millisecond phases (8x2048x16x64) CPU-bound: 1.3 ms for a forward that runs in 0.36."""
    cache = kernels.__dict__.setdefault("_sla_dsl_defaults", {}) if hasattr(kernels, "__dict__") else {}
    if (shape, phase) not in cache:
        method = kernels.default_config
        cache[(shape, phase)] = dict(method(shape, phase=phase) if _takes_phase(method) else method(shape))
    return dict(cache[(shape, phase)])


def config_label(config: dict) -> str:
    """Short text for progress bars and reports: 'chunk_size=64 block_k=64 num_warps=4'."""
    return " ".join(f"{k}={v}" for k, v in sorted(config.items())) or "{}"


def resolve_config(kernels, spec, backend: str, shape: Shape, phase: str, config: dict | None = None) -> dict:
    """The config a call runs with: `config` if given, else the tuned one (checked against tuning_space for
    this shape, since the nearest bucket may be a different shape), else default_config(shape)."""
    if config is not None:
        return config
    cache = kernels.__dict__.setdefault("_sla_dsl_resolved", {}) if hasattr(kernels, "__dict__") else {}
    if (shape, phase) in cache:
        return cache[(shape, phase)]
    chosen = lookup(spec, backend, shape, phase=phase)
    if chosen is not None and chosen not in tuning_space(kernels, shape, phase):
        chosen = None
    if chosen is None:
        chosen = default_config(kernels, shape, phase)
    cache[(shape, phase)] = chosen
    return chosen


def override_config(kernels, spec, backend: str, shape: Shape, phase: str, override: dict | None) -> dict | None:
    """The full config of `phase` with the settings `override` names (keys of any phase; those of another
    phase are ignored), or None without an override. Unknown keys raise a ValueError that lists the valid
    ones. Used by backends that take a fixed config from their constructor, the environment or a call."""
    if override is None:
        return None
    known = {k for p in ("fwd", "bwd") for k in default_config(kernels, shape, p)}
    unknown = sorted(set(override) - known)
    if unknown:
        raise ValueError(f"{backend} config: unknown keys {unknown}; the keys of spec {spec.name!r} are "
                         f"{sorted(known)}")
    phase_config = default_config(kernels, shape, phase)
    return {**phase_config, **{k: v for k, v in override.items() if k in phase_config}}
