"""Backends that run a spec's recurrence.

Each backend module exposes `build(spec) -> kernels`, an object with two methods, called with validated
arguments (absent optional tensors are None; `scale` is already resolved to a float):

    kernels.forward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state)
        -> (o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32/float64 or None)
    kernels.backward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, do, dfinal_state)
        -> (dq, dk, dv, dg, dbeta, dgq, dgk, dinitial_state), None where the input was None

The backward recomputes what it needs from the inputs (no saved residuals), which keeps every backend
behind one autograd wiring (`sla_dsl.torch_ops`, and its eager path `sla_dsl.autograd`).
"""

from __future__ import annotations

import importlib

BACKENDS = ("reference", "triton", "tilelang")
# The opt-in shared memory of one CTA on sm_90 (H100, H200): the target CI compiles for without a GPU.
SM90_SHARED_MEMORY_BYTES = 227 * 1024
# The shared memory of one sm_90 SM for all its resident CTAs, and what the driver reserves of it per CTA.
SM90_SHARED_MEMORY_PER_SM = 233472
SM90_RESERVED_SHARED_PER_CTA = 1024
# Programs (CTAs) the sequential passes' default configs aim for: the H100's 132 SMs. A sequential pass runs one
# program per (sequence, head, block of K and V), each walking all its sequence's chunks, so with fewer programs
# than SMs the rest idle; a GPU with fewer SMs only gets narrower blocks than it needs, and its own sweep replaces
# the default anyway.
SEQUENTIAL_PROGRAMS = 132


def sequential_block(widest: int, dim: int, programs_per_block: int, narrowest: int = 16) -> int:
    """The block of `dim` for a sequential pass's default: halved from `widest`, down to `narrowest`, until
    ceil(dim / block) blocks of `programs_per_block` programs each reach SEQUENTIAL_PROGRAMS."""
    block = widest
    while block > narrowest and programs_per_block * -(-dim // block) < SEQUENTIAL_PROGRAMS:
        block //= 2
    return block


def build_backend(name: str, spec):
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} or auto, got {name!r}")
    return importlib.import_module(f"sla_dsl.backends.{name}").build(spec)
