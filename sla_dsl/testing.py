"""The shared correctness suite: every backend is checked here against the float64 reference.

Used by the CPU tests (Triton's interpreter, TileLang's C target) and by the GPU suite (`python -m sla_dsl
gpu-check`), so both judge kernels by the same inputs and tolerances.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from sla_dsl.alloc import poisoned_outputs
from sla_dsl.formula import Formula
from sla_dsl.reference import reference_forward
from sla_dsl.spec import Decay, FeatureMap, Gates, Recurrence, WriteGateOn, WriteRule

# Relative error ||out - ref|| / ||ref|| allowed, per input dtype: (outputs, gradients).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 1e-2), torch.bfloat16: (5e-3, 1e-2)}
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dgq", "dgk", "dinitial_state")


def recurrence(decay: Decay, write: WriteRule, gates: Gates, **changes) -> Recurrence:
    """A recurrence with the given features (constant decay: a RetNet-like gamma per head)."""
    base = Recurrence(decay=decay, decay_constant=Formula("1 - 2**(-3 - h)") if decay is Decay.CONSTANT else None,
                      write=write, gates=gates, write_gate_on=WriteGateOn.KEY, feature_map_q=FeatureMap.IDENTITY,
                      feature_map_k=FeatureMap.IDENTITY, qk_l2_norm=write is WriteRule.DELTA, scale=None)
    return dataclasses.replace(base, **changes)


def all_combinations() -> list[Recurrence]:
    """Every decay x write rule x gates combination."""
    return [recurrence(d, w, gt) for d, w, gt in itertools.product(Decay, WriteRule, Gates)]


def beta_gate_cases() -> list[Recurrence]:
    """The delta rule with its write gate on beta, under a scalar and a vector decay."""
    return [recurrence(decay, WriteRule.DELTA, Gates.BOTH, write_gate_on=WriteGateOn.BETA)
            for decay in (Decay.SCALAR, Decay.VECTOR)]


def feature_map_cases() -> list[Recurrence]:
    """Each feature map other than the identity on q, another one on k, the L2 norm with two of them."""
    return [recurrence(Decay.SCALAR, WriteRule.ADDITIVE, Gates.BOTH, feature_map_q=fmap,
                       feature_map_k=FeatureMap.SILU if fmap is not FeatureMap.SILU else FeatureMap.RELU,
                       qk_l2_norm=fmap in (FeatureMap.ELU_PLUS_ONE, FeatureMap.SIGMOID))
            for fmap in FeatureMap if fmap is not FeatureMap.IDENTITY]


def feature_map_id(rec: Recurrence) -> str:
    return f"{rec.feature_map_q.value}-{rec.feature_map_k.value}" + ("-l2" if rec.qk_l2_norm else "")


def combination_id(rec: Recurrence) -> str:
    extra = "" if rec.write_gate_on is WriteGateOn.KEY or not rec.write_gate_scales_beta else "-gatebeta"
    return f"{rec.decay.value}-{rec.write.value}-{rec.gates.value}{extra}"


def make_inputs(rec: Recurrence, batch, length, heads, dim_k, dim_v, *, dtype=torch.float32, device="cpu",
                seed=0, initial_state=True, num_sequences=None, decay_strength=1.0):
    """Fresh random inputs for `rec` as a dict of op keyword arguments (q, k, v included)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    args = {"q": rand(batch, length, heads, dim_k), "k": rand(batch, length, heads, dim_k),
            "v": rand(batch, length, heads, dim_v)}
    if rec.write is WriteRule.DELTA and not rec.qk_l2_norm:
        args["k"] = torch.nn.functional.normalize(args["k"], dim=-1)  # keeps the delta rule contractive
    if rec.decay is Decay.SCALAR:
        args["g"] = torch.nn.functional.logsigmoid(rand(batch, length, heads) + 2.0) * decay_strength
    elif rec.decay is Decay.VECTOR:
        args["g"] = torch.nn.functional.logsigmoid(rand(batch, length, heads, dim_k) + 2.0) * decay_strength
    if rec.write is WriteRule.DELTA:
        args["beta"] = torch.rand(batch, length, heads, generator=gen)
    if rec.gates.read:
        args["gq"] = torch.softmax(rand(batch, length, heads), -1)
    if rec.gates.write:
        args["gk"] = torch.softmax(rand(batch, length, heads), -1)
    if initial_state:
        n = num_sequences if num_sequences is not None else batch
        args["initial_state"] = rand(n, heads, dim_k, dim_v) * 0.1
    out = {}
    for name, t in args.items():
        target = torch.float32 if name == "initial_state" and dtype != torch.float64 else dtype
        out[name] = t.to(device=device, dtype=target)
    return out


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere gives inf (never passes)."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def compare_to_reference(rec: Recurrence, kernels, inputs: dict, *, cu_seqlens=None, scale=None,
                         backward=True, output_final_state=True, reference_chunk_size=16) -> dict[str, float]:
    """Runs `kernels` (a backend's build() result) forward and backward on `inputs` with poisoned outputs,
    and returns the relative error of every output and gradient against the float64 reference.

    The reference runs on the inputs' device (float64 on a GPU keeps real-size checks fast)."""
    names = ("q", "k", "v", "g", "beta", "gq", "gk", "initial_state")
    args = [inputs.get(n) for n in names]
    resolved = scale if scale is not None else rec.resolved_scale(inputs["q"].shape[-1])
    with poisoned_outputs():
        o, final_state = kernels.forward(*args, cu_seqlens, resolved, output_final_state)
    ref64 = [t.detach().to(torch.float64).requires_grad_() if t is not None else None for t in args]
    ref_o, ref_final = reference_forward(rec, *ref64[:3], **dict(zip(names[3:], ref64[3:])),
                                         scale=resolved, output_final_state=output_final_state,
                                         cu_seqlens=cu_seqlens, form="chunkwise",
                                         chunk_size=reference_chunk_size)
    errors = {"o": rel_error(o, ref_o)}
    if output_final_state:
        errors["final_state"] = rel_error(final_state, ref_final)
    if not backward:
        return errors
    gen = torch.Generator().manual_seed(1234)
    do = torch.randn(o.shape, generator=gen).to(o)
    dfinal = torch.randn(final_state.shape, generator=gen).to(final_state) if output_final_state else None
    with poisoned_outputs():
        grads = kernels.backward(*args, cu_seqlens, resolved, do, dfinal)
    outputs, seeds = [ref_o], [do.to(torch.float64)]
    if output_final_state:
        outputs.append(ref_final)
        seeds.append(dfinal.to(torch.float64))
    wanted = [t for t in ref64 if t is not None]
    ref_grads = iter(torch.autograd.grad(outputs, wanted, seeds, allow_unused=True))
    for name, t, grad in zip(GRAD_NAMES, ref64, grads):
        if t is None:
            continue
        ref_grad = next(ref_grads)
        ref_grad = torch.zeros_like(t) if ref_grad is None else ref_grad
        errors[name] = rel_error(grad, ref_grad) if ref_grad.norm() > 0 else (
            0.0 if torch.isfinite(grad).all() and grad.abs().max() < 1e-6 else float("inf"))
    return errors
