"""One autograd wiring for every backend's forward/backward kernels."""

from __future__ import annotations

import torch


class KernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, cu_seqlens, scale, output_final_state, q, k, v, g, beta, gq, gk, initial_state):
        o, final_state = kernels.forward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale,
                                         output_final_state)
        ctx.kernels, ctx.cu_seqlens, ctx.scale = kernels, cu_seqlens, scale
        ctx.save_for_backward(q, k, v, g, beta, gq, gk, initial_state)
        return o, final_state

    @staticmethod
    def backward(ctx, do, dfinal_state):
        grads = ctx.kernels.backward(*ctx.saved_tensors, ctx.cu_seqlens, ctx.scale, do.contiguous(),
                                     dfinal_state.contiguous() if dfinal_state is not None else None)
        return (None, None, None, None, *grads)


def apply_kernels(kernels, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state):
    return KernelFunction.apply(kernels, cu_seqlens, scale, output_final_state, q, k, v, g, beta, gq, gk,
                                initial_state)
