"""The Triton backend: chunkwise forward and backward kernels generated from a spec's recurrence.

`build(spec)` imports the spec's generated file (generated/triton/<name>.py, or a user-cache copy for
specs outside specs/) and returns a `TritonKernels` (see `runtime`), which implements the tuning protocol of
`sla_dsl.autotune`: `tuning_space(shape, phase)`, `default_config(shape, phase)`, and forward/backward with
`config=None` (the tuned table's config for the running GPU, else the default). `build(spec, config=...)`
fixes settings for every call (flat keys, e.g. {"BT": 32, "states_BV": 16}).
"""

from __future__ import annotations

from sla_dsl.spec import Spec


def build(spec: Spec, config: dict | None = None):
    from sla_dsl.backends.triton import generator
    from sla_dsl.backends.triton.runtime import TritonKernels
    from sla_dsl.codegen import generated_module

    return TritonKernels(spec, generated_module(spec, "triton", generator.filename(spec)), config)
