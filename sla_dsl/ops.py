"""`sla_dsl.compile`: a spec becomes an op with fla's calling conventions."""

from __future__ import annotations

import os

import torch

from sla_dsl.backends import BACKENDS
from sla_dsl.loader import load_spec
from sla_dsl.spec import Spec
from sla_dsl.torch_ops import get_op
from sla_dsl.validation import validate


class SpecOp:
    """op(q, k, v, *, g, beta, gq, gk, scale, initial_state, output_final_state, cu_seqlens) -> (o, final_state).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] (scalar decay) or [B, T, H, K] (vector decay), natural
    log; beta, gq, gk: [B, T, H]; initial_state / final_state: [N, H, K, V] float32 (float64 for float64
    inputs); cu_seqlens: [N + 1] boundaries of sequences packed along T (B = 1).
    """

    def __init__(self, spec: Spec, backend: str):
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend: expected one of auto, {', '.join(BACKENDS)}, got {backend!r}")
        self.spec = spec
        self.backend = backend
        # Registered eagerly (kernels are built lazily, at the first real call): under torch.compile the call
        # is a dict lookup, never a registration.
        candidates = ("reference", "triton") if backend == "auto" else (backend,)
        self._torch_ops = {name: get_op(spec, name) for name in candidates}

    def backend_for(self, device: torch.device) -> str:
        if self.backend != "auto":
            return self.backend
        return "triton" if device.type == "cuda" else "reference"

    def kernels_for(self, backend: str):
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        return (self._torch_ops.get(backend) or get_op(self.spec, backend)).kernels  # built once, shared with the registered op

    def __call__(self, q, k, v, *, g=None, beta=None, gq=None, gk=None, scale=None, initial_state=None,
                 output_final_state=False, cu_seqlens=None):
        validate(self.spec.recurrence, q, k, v, g=g, beta=beta, gq=gq, gk=gk, scale=scale,
                 initial_state=initial_state, cu_seqlens=cu_seqlens)
        # One registered torch op per (spec, backend): torch.compile traces it with no graph break (the device,
        # hence the backend `auto` picks, is static under compile).
        op = self.torch_op(q.device)
        scale = float(scale) if scale is not None else self.spec.recurrence.resolved_scale(q.shape[-1])
        return op(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state)

    def torch_op(self, device: torch.device):
        """The registered op pair (`sla_dsl.torch_ops.SpecTorchOp`) that runs on `device`."""
        return self._torch_ops[self.backend_for(device)]

    def __repr__(self) -> str:
        return f"SpecOp({self.spec.name!r}, backend={self.backend!r})"


def compile(spec_or_path: Spec | str | os.PathLike, backend: str = "auto") -> SpecOp:  # noqa: A001
    """Loads (if given a path) and compiles a spec for `backend` (auto | reference | triton | tilelang)."""
    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    return SpecOp(spec, backend)
