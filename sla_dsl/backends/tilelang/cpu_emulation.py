"""Runs the generated TileLang kernels on CPU tensors, through TileLang's C target: for tests, not speed.

TileLang's C target has no threads, fragments or shared memory, and no cumulative sum. While a kernel factory
is traced, `emulated()` maps them onto what it has: every buffer becomes a program-private array, T.Parallel a
serial loop nest, T.cumsum (1-D) a serial prefix sum. T.gemm lowers to a scalar loop in fp32. A program then
computes exactly what the kernel's arithmetic says, one tile program after another, so the CPU tests check the
templates' math (indices, masks, decays, gradients) against the float64 reference. They do not check what only
the GPU decides: layouts, pipelining, warp-level reductions; the GPU suite (`gpu-check`) does.
"""

from __future__ import annotations

import contextlib
import threading

import tilelang
import tilelang.language as T

TARGET = "c"
EXECUTION_BACKEND = "cython"  # the C target's host wrapper
# The C target's vectorised casts between float and half do not compile (no vec_type<half, 4>(float4)).
PASS_CONFIGS = {tilelang.PassConfigKey.TIR_DISABLE_VECTORIZE: True}
_lock = threading.Lock()  # the substitution is process-wide while it lasts


@T.macro
def _prefix_sum_1d(buf):
    for i in T.serial(buf.shape[0] - 1):
        buf[i + 1] = buf[i + 1] + buf[i]


@T.macro
def _suffix_sum_1d(buf):
    for r in T.serial(buf.shape[0] - 1):
        buf[buf.shape[0] - 2 - r] = buf[buf.shape[0] - 2 - r] + buf[buf.shape[0] - 1 - r]


def _cumsum(src, dst=None, dim=0, reverse=False):
    """T.cumsum of a 1-D buffer in place (what the templates use; they scan 2-D tiles themselves), as a serial
    scan."""
    if dst is not None or dim != 0 or len(src.shape) != 1:
        raise NotImplementedError("CPU emulation: T.cumsum of a 1-D buffer in place only")
    return _suffix_sum_1d(src) if reverse else _prefix_sum_1d(src)


def _serial_nest(*extents, **_):
    return T.grid(*extents)


def _reciprocal(x):
    return 1.0 / x


# the C target has no fast-math intrinsics: the exact functions stand in for them
_SUBSTITUTES = {"alloc_fragment": T.alloc_local, "alloc_shared": T.alloc_local, "Parallel": _serial_nest,
                "cumsum": _cumsum, "__exp": T.exp, "fast_rcp": _reciprocal}


@contextlib.contextmanager
def emulated():
    """While it lasts, kernel factories trace into kernels TileLang's C target compiles."""
    with _lock:
        saved = {name: getattr(T, name) for name in _SUBSTITUTES}
        for name, substitute in _SUBSTITUTES.items():
            setattr(T, name, substitute)
        try:
            yield
        finally:
            for name, original in saved.items():
                setattr(T, name, original)
