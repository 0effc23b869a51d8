"""The eager PyTorch backend: the chunkwise reference; its backward is autograd through the same code."""

from __future__ import annotations

import torch

from sla_dsl.reference import reference_forward
from sla_dsl.spec import Spec

CHUNK_SIZE = 64


class ReferenceKernels:
    def __init__(self, spec: Spec):
        self.recurrence = spec.recurrence

    def forward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state):
        return reference_forward(self.recurrence, q, k, v, g=g, beta=beta, gq=gq, gk=gk, scale=scale,
                                 initial_state=initial_state, output_final_state=output_final_state,
                                 cu_seqlens=cu_seqlens, form="chunkwise", chunk_size=CHUNK_SIZE)

    def backward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, do, dfinal_state):
        inputs = [t.detach().requires_grad_() if t is not None else None
                  for t in (q, k, v, g, beta, gq, gk, initial_state)]
        with torch.enable_grad():
            o, final_state = self.forward(*inputs, cu_seqlens, scale, dfinal_state is not None)
            outputs, grads = [o], [do]
            if dfinal_state is not None:
                outputs.append(final_state)
                grads.append(dfinal_state)
            wanted = [t for t in inputs if t is not None]
            found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True))
        result = []
        for t in inputs:
            if t is None:
                result.append(None)
                continue
            grad = next(found)
            result.append(torch.zeros_like(t) if grad is None else grad)
        return tuple(result)


def build(spec: Spec) -> ReferenceKernels:
    return ReferenceKernels(spec)
