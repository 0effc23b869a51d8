"""Eager PyTorch semantics of any `Recurrence`: the oracle of every kernel and the CPU path.

Written from the intermediate form, never per backbone. Two independent forms of the same math:
`recurrent` walks token by token; `chunkwise` is the blocked algorithm the kernels implement
(intra-chunk products masked by the relative decay, the WY/UT solve for the delta rule, the state
carried from chunk to chunk). Both are differentiable and run on any device and dtype.

Chunkwise algorithm, per chunk with in-chunk cumulative log decay b_i (vector over K; a scalar
decay broadcasts) and the state S entering the chunk:
    A_qk[i, j] = sum_k q_ik k_jk exp(b_ik - b_jk)   (j <= i)
    delta: L[i, j] = beta_i sum_k k_ik k_jk exp(b_ik - b_jk) (j < i);  T = (I + L)^-1
           u = T (beta v) - T (beta k exp(b)) S;   additive: u = v
    o_i = (q_i exp(b_i))^T S + sum_j A_qk[i, j] u_j
    S <- exp(b_C) S + sum_j (k_j exp(b_C - b_j)) u_j^T
Every exponent above is <= 0, so nothing overflows however strong the decay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sla_dsl.feature_maps import TORCH_FEATURE_MAPS, l2_normalize
from sla_dsl.spec import Decay, Recurrence, WriteRule


@dataclass
class Prepared:
    """The recurrence's operands after feature maps, normalisation, gates and scale: [B, T, H, *]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    log_decay: torch.Tensor  # [B, T, H, K], or [B, T, H, 1] for a decay shared by the key channels
    beta: torch.Tensor | None  # [B, T, H]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare(rec: Recurrence, q, k, v, *, g=None, beta=None, gq=None, gk=None, scale=None) -> Prepared:
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    q = TORCH_FEATURE_MAPS[rec.feature_map_q](q)
    k = TORCH_FEATURE_MAPS[rec.feature_map_k](k)
    if rec.qk_l2_norm:
        q, k = l2_normalize(q), l2_normalize(k)
    scale = rec.resolved_scale(q.shape[-1]) if scale is None else scale
    q = q * scale
    if rec.gates.read:
        q = q * gq.to(dtype).unsqueeze(-1)
    if rec.write_gate_scales_key:
        k = k * gk.to(dtype).unsqueeze(-1)
    if beta is not None:
        beta = beta.to(dtype)
        if rec.write_gate_scales_beta:
            beta = beta * gk.to(dtype)
    num_heads = q.shape[2]
    if rec.decay is Decay.NONE:
        log_decay = q.new_zeros(1, 1, num_heads, 1)
    elif rec.decay is Decay.CONSTANT:
        log_decay = torch.tensor(rec.log_gammas(num_heads), dtype=dtype, device=q.device).view(1, 1, -1, 1)
    elif rec.decay is Decay.SCALAR:
        log_decay = g.to(dtype).unsqueeze(-1)
    else:
        log_decay = g.to(dtype)
    log_decay = log_decay.expand(q.shape[0], q.shape[1], num_heads, log_decay.shape[-1])
    return Prepared(q, k, v, log_decay, beta if rec.write is WriteRule.DELTA else None)


def _recurrent_core(p: Prepared, state: torch.Tensor):
    """One batch of equal-length sequences, token by token. state: [B, H, K, V]."""
    outputs = []
    for t in range(p.q.shape[1]):
        decay = p.log_decay[:, t].exp().unsqueeze(-1)  # [B, H, K or 1, 1]
        state = state * decay
        k_t, v_t = p.k[:, t], p.v[:, t]
        if p.beta is not None:
            predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)
            v_t = p.beta[:, t].unsqueeze(-1) * (v_t - predicted)
        state = state + torch.einsum("bhk,bhv->bhkv", k_t, v_t)
        outputs.append(torch.einsum("bhk,bhkv->bhv", p.q[:, t], state))
    return torch.stack(outputs, 1), state


def _chunkwise_core(p: Prepared, state: torch.Tensor, chunk_size: int):
    batch, length, heads, dim_k = p.q.shape
    pad = (-length) % chunk_size

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, H, N, C, D]
        x = x.expand(batch, length, heads, x.shape[-1]).transpose(1, 2)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))  # padded tokens: k = v = 0, no decay, beta = 0
        return x.reshape(batch, heads, -1, chunk_size, x.shape[-1])

    q, k, v = blocks(p.q), blocks(p.k), blocks(p.v)
    cumulative = blocks(p.log_decay.expand(batch, length, heads, dim_k)).cumsum(-2)
    beta = blocks(p.beta.unsqueeze(-1)) if p.beta is not None else None
    index = torch.arange(chunk_size, device=q.device)
    inclusive = (index[:, None] >= index[None, :]).view(chunk_size, chunk_size, 1)
    strict = (index[:, None] > index[None, :]).view(chunk_size, chunk_size, 1)
    eye = torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    outputs = []
    for n in range(q.shape[2]):
        q_n, k_n, v_n, b = q[:, :, n], k[:, :, n], v[:, :, n], cumulative[:, :, n]
        relative = b.unsqueeze(-2) - b.unsqueeze(-3)  # [B, H, C(i), C(j), K]: b_i - b_j
        decay_in = torch.where(inclusive, relative, -torch.inf).exp()
        a_qk = torch.einsum("bhik,bhjk,bhijk->bhij", q_n, k_n, decay_in)
        if beta is not None:
            decay_strict = torch.where(strict, relative, -torch.inf).exp()
            lower = beta[:, :, n] * torch.einsum("bhik,bhjk,bhijk->bhij", k_n, k_n, decay_strict)
            unit_lower = eye + lower
            solve = lambda rhs: torch.linalg.solve_triangular(unit_lower, rhs, upper=False,  # noqa: E731
                                                              unitriangular=True)
            u = solve(beta[:, :, n] * v_n) - solve(beta[:, :, n] * k_n * b.exp()) @ state
        else:
            u = v_n
        outputs.append((q_n * b.exp()) @ state + a_qk @ u)
        last = b[:, :, -1:]  # [B, H, 1, K]
        state = state * last.transpose(-1, -2).exp() + (k_n * (last - b).exp()).transpose(-1, -2) @ u
    o = torch.stack(outputs, 2).reshape(batch, heads, -1, v.shape[-1])[:, :, :length]
    return o.transpose(1, 2), state


def _run_sequences(core, p: Prepared, initial_state, cu_seqlens):
    """Applies `core` per batch (no cu_seqlens) or per packed sequence (cu_seqlens, B = 1)."""
    batch, _, heads, dim_k = p.q.shape
    dim_v = p.v.shape[-1]
    dtype = p.q.dtype
    if cu_seqlens is None:
        state = (initial_state.to(dtype) if initial_state is not None
                 else p.q.new_zeros(batch, heads, dim_k, dim_v))
        return core(p, state)
    bounds = cu_seqlens.tolist()
    outputs, finals = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = Prepared(p.q[:, start:end], p.k[:, start:end], p.v[:, start:end],
                         p.log_decay[:, start:end],
                         p.beta[:, start:end] if p.beta is not None else None)
        state = (initial_state[i:i + 1].to(dtype) if initial_state is not None
                 else p.q.new_zeros(1, heads, dim_k, dim_v))
        if end > start:
            o, state = core(piece, state)
            outputs.append(o)
        finals.append(state)
    o = torch.cat(outputs, 1) if outputs else p.v.new_zeros(1, 0, heads, dim_v)
    return o, torch.cat(finals, 0)


def reference_forward(rec: Recurrence, q, k, v, *, g=None, beta=None, gq=None, gk=None, scale=None,
                      initial_state=None, output_final_state=False, cu_seqlens=None, form="chunkwise",
                      chunk_size=16):
    """Inputs as validated by `sla_dsl.validation`; returns (o in v's dtype, final_state or None)."""
    p = prepare(rec, q, k, v, g=g, beta=beta, gq=gq, gk=gk, scale=scale)
    if form == "recurrent":
        core = _recurrent_core
    elif form == "chunkwise":
        core = lambda prepared, state: _chunkwise_core(prepared, state, chunk_size)  # noqa: E731
    else:
        raise ValueError(f"form: expected 'recurrent' or 'chunkwise', got {form!r}")
    o, final_state = _run_sequences(core, p, initial_state, cu_seqlens)
    final_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return o.to(v.dtype), final_state.to(final_dtype) if output_final_state else None
