"""Realistic benchmark and tuning inputs, and the flash-linear-attention (fla) op doing the same work.

Inputs (per the spec's recurrence): q, k, v ~ N(0, 1) in the benchmark dtype (feature maps and the L2 norm
are the spec's and run in-kernel); scalar decay g = logsigmoid(N(0,1) + 2) (GDN-like, in (-inf, 0), mostly
-0.1..-0.3), vector decay g = logsigmoid(N(0,1)) / 16 (GLA's parametrisation), both float32; beta =
sigmoid(N(0,1)); SLA gates gq, gk = softmax over heads of N(0,1).

fla has no SLA gates and no fused feature maps other than GDN's in-kernel L2 norm, so `fla_equivalent`
returns the backbone's fla op with the rest done by torch around it (timed with it), and a note saying so.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from sla_dsl.feature_maps import TORCH_FEATURE_MAPS, l2_normalize
from sla_dsl.spec import Decay, FeatureMap, Recurrence, WriteRule


def realistic_inputs(rec: Recurrence, B: int, T: int, H: int, K: int, V: int, *, dtype=torch.bfloat16,
                     device="cuda", seed: int = 0, requires_grad: bool = False) -> dict:
    """Op keyword arguments q, k, v (+ g, beta, gq, gk as the spec needs), generated on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape, dt=dtype: torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)  # noqa: E731
    args = {"q": rand(B, T, H, K), "k": rand(B, T, H, K), "v": rand(B, T, H, V)}
    if rec.decay is Decay.SCALAR:
        args["g"] = F.logsigmoid(rand(B, T, H, dt=torch.float32) + 2.0)
    elif rec.decay is Decay.VECTOR:
        args["g"] = F.logsigmoid(rand(B, T, H, K, dt=torch.float32)) / 16
    if rec.write is WriteRule.DELTA:
        args["beta"] = torch.sigmoid(rand(B, T, H, dt=torch.float32)).to(dtype)
    if rec.gates.read:
        args["gq"] = torch.softmax(rand(B, T, H, dt=torch.float32), -1).to(dtype)
    if rec.gates.write:
        args["gk"] = torch.softmax(rand(B, T, H, dt=torch.float32), -1).to(dtype)
    if requires_grad:
        for t in args.values():
            t.requires_grad_(True)
    return args


def backbone_name(rec: Recurrence) -> str:
    """'retnet' | 'gla' | 'gdn' | 'simple_gla' | 'other': which fla op family a recurrence belongs to."""
    if rec.write is WriteRule.ADDITIVE and rec.decay is Decay.CONSTANT:
        return "retnet"
    if rec.write is WriteRule.ADDITIVE and rec.decay is Decay.VECTOR:
        return "gla"
    if rec.write is WriteRule.ADDITIVE and rec.decay is Decay.SCALAR:
        return "simple_gla"
    if rec.write is WriteRule.DELTA and rec.decay is Decay.SCALAR:
        return "gdn"
    return "other"


def _fla_retnet_gammas_match(rec: Recurrence, heads: int) -> bool:
    """fla's chunk_retention fixes gamma_h = 1 - 2^(-5-h); other constants go through chunk_simple_gla."""
    ours = rec.log_gammas(heads)
    theirs = [math.log(1 - 2.0 ** (-5 - h)) for h in range(heads)]
    return all(abs(a - b) < 1e-9 for a, b in zip(ours, theirs))


def fla_equivalent(rec: Recurrence, heads: int):
    """(op_name, fn, note) where fn(**realistic_inputs) -> o runs fla's op on the same math, or None when fla
    has no op for this recurrence. Raises ImportError when fla is not installed."""
    os.environ.setdefault("FLA_CACHE_RESULTS", "1")  # keep fla's autotune results in the Triton cache
    notes = []
    phi_q, phi_k = TORCH_FEATURE_MAPS[rec.feature_map_q], TORCH_FEATURE_MAPS[rec.feature_map_k]
    if rec.feature_map_q is not FeatureMap.IDENTITY or rec.feature_map_k is not FeatureMap.IDENTITY:
        notes.append(f"{rec.feature_map_q.value}/{rec.feature_map_k.value} feature map in torch")
    backbone = backbone_name(rec)
    gates_outside = rec.gates.read or rec.gates.write
    l2_in_kernel = backbone == "gdn" and rec.qk_l2_norm and not gates_outside
    if gates_outside:
        notes.append("SLA gates applied to q/k in torch" + (" after torch l2 norm" if rec.qk_l2_norm else ""))
    elif rec.qk_l2_norm and not l2_in_kernel:
        notes.append("l2 norm in torch")

    def prep(q, k, gq=None, gk=None, beta=None):
        q, k = phi_q(q), phi_k(k)
        if rec.qk_l2_norm and not l2_in_kernel:
            q, k = l2_normalize(q), l2_normalize(k)
        if gq is not None:
            q = q * gq.unsqueeze(-1)
        if gk is not None:
            if rec.write_gate_scales_beta:
                beta = beta * gk
            else:
                k = k * gk.unsqueeze(-1)
        return q, k, beta

    scale = rec.resolved_scale  # a function of K
    if backbone == "retnet":
        if _fla_retnet_gammas_match(rec, heads):
            from fla.ops.retention import chunk_retention

            def fn(q, k, v, gq=None, gk=None, **_):
                q2, k2, _b = prep(q, k, gq, gk)
                return chunk_retention(q2, k2, v, scale=scale(q.shape[-1]))[0]
            return "chunk_retention", fn, "; ".join(notes)
        from fla.ops.simple_gla import chunk_simple_gla

        gammas = torch.tensor(rec.log_gammas(heads), dtype=torch.float32)

        def fn(q, k, v, gq=None, gk=None, **_):
            q2, k2, _b = prep(q, k, gq, gk)
            return chunk_simple_gla(q2, k2, v, g_gamma=gammas.to(q.device), scale=scale(q.shape[-1]))[0]
        return "chunk_simple_gla", fn, "; ".join(notes)
    if backbone == "simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla

        def fn(q, k, v, g, gq=None, gk=None, **_):
            q2, k2, _b = prep(q, k, gq, gk)
            return chunk_simple_gla(q2, k2, v, g=g, scale=scale(q.shape[-1]))[0]
        return "chunk_simple_gla", fn, "; ".join(notes)
    if backbone == "gla":
        from fla.ops.gla import chunk_gla

        def fn(q, k, v, g, gq=None, gk=None, **_):
            q2, k2, _b = prep(q, k, gq, gk)
            return chunk_gla(q2, k2, v, g, scale=scale(q.shape[-1]))[0]
        return "chunk_gla", fn, "; ".join(notes)
    if backbone == "gdn":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        if l2_in_kernel:
            notes.append("l2 norm in fla's kernel")

        def fn(q, k, v, g, beta, gq=None, gk=None, **_):
            q2, k2, beta2 = prep(q, k, gq, gk, beta)
            return chunk_gated_delta_rule(q2, k2, v, g, beta2, scale=scale(q.shape[-1]),
                                          use_qk_l2norm_in_kernel=l2_in_kernel)[0]
        return "chunk_gated_delta_rule", fn, "; ".join(notes)
    return None


def sdpa_inputs(B: int, T: int, H: int, K: int, V: int, *, dtype=torch.bfloat16, device="cuda", seed=0,
                requires_grad=False):
    """q, k, v in [B, H, T, D] for torch's causal scaled_dot_product_attention (SDPA needs K == V for the
    flash kernel; V != K still runs, on another kernel)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = [torch.randn(B, H, T, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
           for d in (K, K, V)]
    for t in out:
        t.requires_grad_(requires_grad)
    return out


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
