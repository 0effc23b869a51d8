"""The Triton backend: chunkwise forward and backward kernels generated from a spec's recurrence.

`build(spec)` imports the spec's generated file (generated/triton/<name>.py, or a user-cache copy for
specs outside specs/) and returns a `TritonKernels` (see `runtime`). Config interface for tuning:
`runtime.default_config(rec, K, V, dtype)`, `runtime.TUNING_SPACE`, and `build(spec, config=...)` or
`kernels.config = {...}` (merged over the default).
"""

from __future__ import annotations

from sla_dsl.spec import Spec


def build(spec: Spec, config: dict | None = None):
    from sla_dsl.backends.triton import generator
    from sla_dsl.backends.triton.runtime import TritonKernels
    from sla_dsl.codegen import generated_module

    return TritonKernels(spec, generated_module(spec, "triton", generator.filename(spec)), config)
