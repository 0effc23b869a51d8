"""Every compiled spec as a registered torch op, so `torch.compile(fullgraph=True)` traces through it.

For one (spec content, backend) pair this registers, under the `sla_dsl` namespace:

    sla_dsl::<name>_<hash>_<backend>(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta, Tensor? gq,
        Tensor? gk, Tensor? initial_state, Tensor? cu_seqlens, float scale, bool output_final_state)
        -> (Tensor o, Tensor final_state)
    sla_dsl::<name>_<hash>_<backend>_bwd(<the same inputs>, Tensor do, Tensor? dfinal_state)
        -> (Tensor dq, dk, dv, dg, dbeta, dgq, dgk, dinitial_state)

with a fake (meta) implementation (outputs are contiguous) for each and the forward's autograd formula calling the backward op,
which calls the backend's `kernels.backward` (the backward recomputes from the inputs: only the inputs are
saved). Eager calls with plain tensors skip the dispatcher: `sla_dsl.autograd` runs the same implementations.
Conventions at the op boundary: `final_state` is an empty tensor when `output_final_state` is False, and an
absent gradient is an empty tensor (both are mapped back to None by `call`). The hash covers
the spec file's hash and the recurrence itself, so a derived recurrence (e.g. the module layer's copy
without the read gate) gets an op of its own.

The ops' fake implementations derive every output shape from the input shapes (the number of packed
sequences is `cu_seqlens.shape[0] - 1`), so batch size and sequence length can be dynamic.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading

import torch

from sla_dsl.autograd import EagerFunction, takes_eager_path
from sla_dsl.backends import build_backend
from sla_dsl.spec import Spec

NAMESPACE = "sla_dsl"

_SCHEMA_INPUTS = ("Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta, Tensor? gq, Tensor? gk, "
                  "Tensor? initial_state, Tensor? cu_seqlens, float scale, bool output_final_state")
FORWARD_SCHEMA = f"({_SCHEMA_INPUTS}) -> (Tensor, Tensor)"
BACKWARD_SCHEMA = (f"({_SCHEMA_INPUTS}, Tensor do, Tensor? dfinal_state) "
                   "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_GRADIENT_INPUTS = 8  # q, k, v, g, beta, gq, gk, initial_state

_lock = threading.Lock()
_registered: dict[str, "SpecTorchOp"] = {}


def op_key(spec: Spec) -> str:
    """12 hex digits of the hash of the spec's source and its recurrence (what the kernels compute)."""
    text = f"{spec.source_sha256}\n{spec.recurrence!r}\n{spec.layer.num_heads}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def op_name(spec: Spec, backend: str) -> str:
    return f"{spec.name}_{op_key(spec)}_{backend}"


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype if dtype is not None else like.dtype)


def _unalias(out: torch.Tensor, inputs) -> torch.Tensor:
    """Custom ops may not return an input (or a view of one): copies such an output."""
    if out.numel() == 0:
        return out
    storage = out.untyped_storage().data_ptr()
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.numel() > 0 and t.untyped_storage().data_ptr() == storage:
            return out.clone()
    return out


_AUTOGRAD_KEYS = tuple(getattr(torch._C.DispatchKey, name) for name in (
    "AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView", "AutogradCPU",
    "AutogradCUDA") if hasattr(torch._C.DispatchKey, name))


@contextlib.contextmanager
def _autograd_dispatch():
    """Re-enables autograd inside an op implementation (the dispatcher runs it below autograd): a backend
    whose backward differentiates its own PyTorch forward (the reference) needs it. No-op for the others."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


class SpecTorchOp:
    """The registered forward and backward ops of one (spec, backend) pair."""

    def __init__(self, spec: Spec, backend: str):
        self.spec = spec
        self.backend = backend
        self.name = op_name(spec, backend)
        self._kernels = None
        self.forward_op = self._register_forward()
        self.backward_op = self._register_backward()
        self._register_autograd()

    @property
    def kernels(self):
        if self._kernels is None:
            self._kernels = build_backend(self.backend, self.spec)
        return self._kernels

    # -- forward -------------------------------------------------------------------------------------------
    def _register_forward(self):
        name = f"{NAMESPACE}::{self.name}"

        def forward_impl(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state):
            inputs = (q, k, v, g, beta, gq, gk, initial_state, cu_seqlens)
            # Autocast must not reach into a backend (the reference would compute in bf16): it gets the
            # dtypes it was called with.
            with torch.autocast(q.device.type, enabled=False):
                o, final_state = self.kernels.forward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens,
                                                      scale, output_final_state)
            if final_state is None or not output_final_state:
                final_state = _empty(q, _state_dtype(q.dtype))
            return _unalias(o.contiguous(), inputs), _unalias(final_state.contiguous(), inputs)

        self.forward_impl = forward_impl
        op = torch.library.custom_op(name, forward_impl, mutates_args=(), schema=FORWARD_SCHEMA)

        @op.register_fake
        def _(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state):
            batch, length, heads, dim_k = q.shape
            dim_v = v.shape[-1]
            o = v.new_empty((batch, length, heads, dim_v))
            if not output_final_state:
                return o, _empty(q, _state_dtype(q.dtype))
            num_sequences = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
            return o, q.new_empty((num_sequences, heads, dim_k, dim_v), dtype=_state_dtype(q.dtype))

        return op

    # -- backward ------------------------------------------------------------------------------------------
    def _register_backward(self):
        name = f"{NAMESPACE}::{self.name}_bwd"

        def backward_impl(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state,
                          do, dfinal_state):
            inputs = (q, k, v, g, beta, gq, gk, initial_state)
            with _autograd_dispatch(), torch.autocast(q.device.type, enabled=False):
                grads = self.kernels.backward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale,
                                              do.contiguous(),
                                              dfinal_state.contiguous() if dfinal_state is not None else None)
            every = (*inputs, cu_seqlens, do, dfinal_state)
            return tuple(_empty(q) if t is None else _unalias(grad.contiguous(), every) for t, grad in zip(inputs, grads))

        self.backward_impl = backward_impl
        op = torch.library.custom_op(name, backward_impl, mutates_args=(), schema=BACKWARD_SCHEMA)

        @op.register_fake
        def _(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state, do, dfinal_state):
            return tuple(_empty(q) if t is None else t.new_empty(t.shape)
                         for t in (q, k, v, g, beta, gq, gk, initial_state))

        return op

    @staticmethod
    def input_gradients(backward, saved, scale: float, output_final_state: bool, do, dfinal_state) -> tuple:
        """The gradients of q .. initial_state (None for an absent input) from `backward` (the backward op or
        its implementation), given the saved inputs q .. initial_state, cu_seqlens and the outputs' gradients."""
        q, k, v, g, beta, gq, gk, initial_state, cu_seqlens = saved
        if not output_final_state:
            dfinal_state = None
        if do is None:
            do = torch.zeros_like(v)
        grads = backward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state, do,
                         dfinal_state)
        return tuple(grad if t is not None else None for t, grad in zip(saved[:_GRADIENT_INPUTS], grads))

    def _register_autograd(self):
        backward_op = self.backward_op

        def setup_context(ctx, inputs, output):
            q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state = inputs
            ctx.save_for_backward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens)
            ctx.scale = scale
            ctx.output_final_state = output_final_state

        def backward(ctx, do, dfinal_state):
            grads = self.input_gradients(backward_op, ctx.saved_tensors, ctx.scale, ctx.output_final_state, do,
                                         dfinal_state)
            return (*grads, None, None, None)

        self.forward_op.register_autograd(backward, setup_context=setup_context)

    # -- calling -------------------------------------------------------------------------------------------
    def __call__(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale: float,
                 output_final_state: bool):
        args = (q, k, v, g, beta, gq, gk, initial_state, cu_seqlens)
        if takes_eager_path(args):
            o, final_state = EagerFunction.apply(self, float(scale), bool(output_final_state), *args)
        else:
            o, final_state = self.forward_op(*args, float(scale), bool(output_final_state))
        return o, (final_state if output_final_state else None)


def get_op(spec: Spec, backend: str) -> SpecTorchOp:
    """The registered op pair of (spec, backend), registering it at the first call (once per process)."""
    name = op_name(spec, backend)
    with _lock:
        op = _registered.get(name)
        if op is None:
            op = _registered[name] = SpecTorchOp(spec, backend)
    return op
