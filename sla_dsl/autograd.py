"""The eager path of a spec's torch op: an autograd.Function around the op's own implementations.

`sla_dsl.torch_ops` registers every (spec, backend) pair as a custom op, which is what torch.compile traces. Called
eagerly, a custom op costs host time in the dispatcher, its autograd wrapper and its checks, and at small shapes
the host time is the call's time: on the H100 at 8x2048x16x64 (bf16) retnet's TileLang forward+backward took 1.42
ms through the custom op while its kernels run in 0.70 (the sweep's fwd and bwd), and a profile put 44% of the host
time in the custom op's dispatch (benchmarks/NVIDIA_H100_80GB_HBM3/2026-11-24-session15/hostprof-tilelang.log). So
an eager call with plain tensors (`takes_eager_path`) runs the same forward and backward implementations through
this Function instead: the same kernels, the same results."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def takes_eager_path(tensors) -> bool:
    """Whether a call may bypass the dispatcher: not under torch.compile, no dispatch mode (FakeTensorMode,
    tracing) or functorch transform (vmap, grad) active, and no tensor subclass among the inputs. Otherwise the
    registered op runs, which those mechanisms know how to handle."""
    return (not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode()
            and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


class EagerFunction(torch.autograd.Function):
    """apply(torch_op, scale, output_final_state, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens) ->
    (o, final_state) as the registered op returns them, with the registered op's gradients."""

    @staticmethod
    def forward(ctx, torch_op, scale, output_final_state, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens):
        ctx.set_materialize_grads(False)  # an unused final state's gradient stays None, as the backward takes it
        ctx.torch_op, ctx.scale, ctx.output_final_state = torch_op, scale, output_final_state
        ctx.save_for_backward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens)
        return torch_op.forward_impl(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state)

    @staticmethod
    def backward(ctx, do, dfinal_state):
        grads = ctx.torch_op.input_gradients(ctx.torch_op.backward_impl, ctx.saved_tensors, ctx.scale,
                                             ctx.output_final_state, do, dfinal_state)
        return (None, None, None, *grads, None)
