"""Checks an op call's arguments against the spec: every failure names the argument, the expected and the received."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sla_dsl.spec import Decay, Recurrence

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Shapes:
    batch: int
    length: int
    heads: int
    dim_k: int
    dim_v: int
    num_sequences: int


def _fail(name: str, expected: str, got: str) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def _shape(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}"


def _check_tensor(name, t, shape, dtype_ok, dtype_text, device):
    if not isinstance(t, torch.Tensor):
        raise _fail(name, "a torch.Tensor", type(t).__name__)
    if tuple(t.shape) != tuple(shape):
        raise _fail(name, f"shape {list(shape)}", _shape(t))
    if not dtype_ok(t.dtype):
        raise _fail(name, dtype_text, f"dtype {t.dtype}")
    if t.device != device:
        raise _fail(name, f"a tensor on {device} (where q is)", f"a tensor on {t.device}")


def validate(rec: Recurrence, q, k, v, *, g, beta, gq, gk, scale, initial_state, cu_seqlens) -> Shapes:
    for name, t, rank in (("q", q, 4), ("k", k, 4), ("v", v, 4)):
        if not isinstance(t, torch.Tensor):
            raise _fail(name, "a torch.Tensor [B, T, H, K]", type(t).__name__)
        if t.dim() != rank:
            raise _fail(name, f"a {rank}-d tensor [B, T, H, {'V' if name == 'v' else 'K'}]", _shape(t))
        if t.dtype not in FLOAT_DTYPES:
            raise _fail(name, "dtype float16, bfloat16, float32 or float64", f"dtype {t.dtype}")
    batch, length, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    device, dtype = q.device, q.dtype
    same_dtype = lambda d: d == dtype  # noqa: E731
    _check_tensor("k", k, (batch, length, heads, dim_k), same_dtype, f"dtype {dtype} (as q)", device)
    _check_tensor("v", v, (batch, length, heads, dim_v), same_dtype, f"dtype {dtype} (as q)", device)
    if dim_k == 0 or dim_v == 0 or heads == 0:
        raise _fail("q", "non-empty head and feature dimensions", _shape(q))
    is_float = lambda d: d in FLOAT_DTYPES  # noqa: E731

    if rec.decay in (Decay.SCALAR, Decay.VECTOR):
        shape = (batch, length, heads) if rec.decay is Decay.SCALAR else (batch, length, heads, dim_k)
        what = "[B, T, H]" if rec.decay is Decay.SCALAR else "[B, T, H, K]"
        if g is None:
            raise _fail("g", f"a {rec.decay.value} log-decay {what} (the spec has decay: {rec.decay.value})", "None")
        if isinstance(g, torch.Tensor) and g.dim() != len(shape):
            raise _fail("g", f"a {rec.decay.value} log-decay {what} = {list(shape)} (the spec has decay: "
                        f"{rec.decay.value})", _shape(g))
        _check_tensor("g", g, shape, is_float, "a floating dtype", device)
    elif g is not None:
        raise _fail("g", f"None (the spec has decay: {rec.decay.value}, which takes no g)", _shape(g)
                    if isinstance(g, torch.Tensor) else type(g).__name__)

    for name, needed, feature in (("beta", rec.needs_beta, "delta write rule"), ("gq", rec.gates.read, "read gate"),
                                  ("gk", rec.gates.write, "write gate")):
        value = {"beta": beta, "gq": gq, "gk": gk}[name]
        if needed:
            if value is None:
                raise _fail(name, f"a tensor [B, T, H] = {[batch, length, heads]} (the spec has a {feature})", "None")
            _check_tensor(name, value, (batch, length, heads), is_float, "a floating dtype", device)
        elif value is not None:
            raise _fail(name, f"None (the spec has no {feature})", "a tensor")

    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise _fail("scale", "None or a positive number", repr(scale))

    num_sequences = batch
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise _fail("cu_seqlens", "a 1-d integer tensor [N + 1] of sequence boundaries",
                        _shape(cu_seqlens) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__)
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise _fail("cu_seqlens", "dtype int32 or int64", f"dtype {cu_seqlens.dtype}")
        if cu_seqlens.device != device:
            raise _fail("cu_seqlens", f"a tensor on {device} (where q is)", f"a tensor on {cu_seqlens.device}")
        if batch != 1:
            raise _fail("q", "batch size 1 with cu_seqlens (sequences packed along T)", _shape(q))
        num_sequences = cu_seqlens.shape[0] - 1
        if not torch.compiler.is_compiling():  # the values of a traced tensor are unknown (no .tolist())
            bounds = cu_seqlens.tolist()
            if bounds[0] != 0 or bounds[-1] != length or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
                raise _fail("cu_seqlens", f"non-decreasing boundaries from 0 to T = {length}", str(bounds))

    if initial_state is not None:
        state_dtype_ok = lambda d: d in (torch.float32, torch.float64)  # noqa: E731
        _check_tensor("initial_state", initial_state, (num_sequences, heads, dim_k, dim_v), state_dtype_ok,
                      "dtype float32 or float64", device)
    return Shapes(batch, length, heads, dim_k, dim_v, num_sequences)
