"""`SpecAttention`: the token-mixing layer a spec describes, around the spec's registered op.

What the layer builds from `spec.layer` (argument names follow fla's layers):

    q, k, v     = x W_q, x W_k, x W_v            key width expand_k * hidden, value width expand_v * hidden
    short conv  : causal depthwise conv + SiLU on q, k, v (use_short_conv), cu_seqlens-aware, carried state
    g (decay)   : gdn                 g = -exp(A_log) * softplus(x W_a + dt_bias)            [B, T, H]
                  logsigmoid          g = logsigmoid(x W_g + b) / normalizer        [B, T, H] or [B, T, H, K]
                  logsigmoid_low_rank g = logsigmoid(x W_1 W_2 + b) / normalizer    (GLA)
                  constant / none     nothing (RetNet's gammas live in the spec)
    beta        : sigmoid(x W_b) or 2 sigmoid(x W_b)                                   (delta rule)
    SLA gates   : G^Q = softmax_heads(x W_GQ), G^K = softmax_heads(x W_GK), W_* hidden x H
    output      : per-head norm (RMSNorm, or GroupNorm with weight and bias), then the output gate
                  (swish / sigmoid of x W_gate), then W_o.

The read gate and the output norm: a per-head norm divides out any per-head scalar, so with a norm the
read gate is applied to the normed output (the kernel runs the spec's recurrence without the read gate,
gq=None); without a norm it is fused in the kernel (exactly the same math: o = S^T (G^Q q) = G^Q S^T q).

Padding (`attention_mask` [B, T], 1 = token, 0 = padding, e.g. left padding): padded tokens write nothing
(v = 0, k = 0, beta = 0) and do not decay the state (g = 0), and their inputs to the short convolution are
zero; so the real tokens' outputs equal those of the unpadded sequence. Limitation: a constant decay (RetNet)
cannot be switched off per token, so left padding before a non-zero `past_state` decays that state.

Recurrent state (`use_cache=True`): a dict {"recurrent_state": [N, H, K, V] float32, "conv_state": (q, k, v)
conv states [N, conv_size - 1, D] or None}; pass it back as `past_state` to continue (incremental decoding).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from sla_dsl.loader import load_spec
from sla_dsl.ops import SpecOp
from sla_dsl.spec import BetaForm, Decay, DecayForm, Gates, OutputGate, OutputNorm, Spec


def resolve_spec(spec: Spec | str | os.PathLike) -> Spec:
    return spec if isinstance(spec, Spec) else load_spec(spec)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Gates, decays and norms are computed in float32 from 16-bit activations (range and precision), and in
    float64 from float64 ones (a float32 cast there would round what the float64 checks compare)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ShortConvolution(nn.Conv1d):
    """Causal depthwise convolution + SiLU over [B, T, D], with packed sequences (cu_seqlens, B = 1) and a
    carried state (the last `kernel_size - 1` inputs of every sequence: [N, kernel_size - 1, D])."""

    def __init__(self, hidden_size: int, kernel_size: int):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=False)

    def forward(self, x: torch.Tensor, *, cache: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                output_final_state: bool = False):
        width = self.kernel_size[0]
        weight = self.weight.squeeze(1).to(x.dtype)  # [D, W]; tap W-1 is the current token
        if cu_seqlens is None:
            past = cache.to(x.dtype) if cache is not None else x.new_zeros(x.shape[0], width - 1, x.shape[2])
            extended = torch.cat([past, x], 1)  # [B, W-1+T, D]
            # A sum of shifted products rather than F.conv1d: the convolution's backend choice guards on the
            # batch size under torch.compile (a recompile per new B), and inductor fuses these into one kernel.
            length = x.shape[1]
            y = sum(extended[:, j:j + length] * weight[:, j] for j in range(width))
            final = extended[:, extended.shape[1] - (width - 1):] if output_final_state else None
            return F.silu(y), final
        # Packed sequences: gather, per token and tap, the input j tokens back within its own sequence (or from
        # that sequence's carried state).
        length = x.shape[1]
        tokens = x[0]
        cu = cu_seqlens.to(torch.long)
        pos = torch.arange(length, device=x.device)
        seq = torch.searchsorted(cu[1:], pos, right=True)
        start = cu[seq]
        y = torch.zeros_like(tokens)
        for j in range(width):
            src = pos - j
            y = y + self._gather(tokens, cache, src, start, seq) * weight[:, width - 1 - j]
        final = None
        if output_final_state:
            num = cu.shape[0] - 1
            back = torch.arange(width - 1, device=x.device)
            src = cu[1:].unsqueeze(1) - (width - 1) + back  # [N, W-1]
            seqs = torch.arange(num, device=x.device).unsqueeze(1).expand_as(src)
            final = self._gather(tokens, cache, src, cu[:-1].unsqueeze(1).expand_as(src), seqs)
        return F.silu(y).unsqueeze(0), final

    def _gather(self, tokens, cache, src, start, seq):
        """Input at absolute position `src` of the sequence `seq` starting at `start` (elementwise)."""
        inside = src >= start
        values = tokens[src.clamp(min=0)] * inside.unsqueeze(-1).to(tokens.dtype)
        if cache is None:
            return values
        width = self.kernel_size[0]
        index = (width - 1 - (start - src)).clamp(min=0, max=width - 2)
        return torch.where(inside.unsqueeze(-1), values, cache.to(tokens.dtype)[seq, index])


class HeadNorm(nn.Module):
    """Per-head output norm over [B, T, H, V]: RMSNorm (weight [V], shared by the heads, as fla) or GroupNorm
    (one group per head, mean-centred, weight and bias [H * V])."""

    def __init__(self, kind: OutputNorm, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        if kind is OutputNorm.RMSNORM:
            self.weight = nn.Parameter(torch.ones(head_dim))
        else:
            self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
            self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = at_least_float32(x)
        if self.kind is OutputNorm.RMSNORM:
            return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps) * self.weight
        h = h - h.mean(-1, keepdim=True)
        return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


class SpecAttention(nn.Module):
    """forward(x [B, T, D], attention_mask=None, cu_seqlens=None, past_state=None, use_cache=False)
    -> y [B, T, D], or (y, state) with use_cache. Arguments left None take the spec's `layer` values."""

    def __init__(self, spec: Spec | str | os.PathLike, hidden_size: int = 1024, num_heads: int | None = None, *,
                 expand_k: float | None = None, expand_v: float | None = None, use_short_conv: bool | None = None,
                 conv_size: int | None = None, norm_eps: float | None = None, backend: str = "auto",
                 mode: str = "chunk", layer_idx: int | None = None):
        super().__init__()
        spec = resolve_spec(spec)
        cfg = spec.layer
        rec = spec.recurrence
        if mode not in ("chunk", "fused_chunk"):
            raise ValueError(f"mode: expected 'chunk' (the chunkwise kernels), got {mode!r}")
        self.spec, self.layer_idx, self.mode = spec, layer_idx, mode
        self.hidden_size = hidden_size
        self.num_heads = num_heads if num_heads is not None else cfg.num_heads
        self.expand_k = expand_k if expand_k is not None else cfg.expand_k
        self.expand_v = expand_v if expand_v is not None else cfg.expand_v
        self.use_short_conv = use_short_conv if use_short_conv is not None else cfg.short_conv
        self.conv_size = conv_size if conv_size is not None else cfg.conv_size
        self.norm_eps = norm_eps if norm_eps is not None else cfg.norm_eps
        self.key_dim = int(hidden_size * self.expand_k)
        self.value_dim = int(hidden_size * self.expand_v)
        for name, dim in (("key", self.key_dim), ("value", self.value_dim)):
            if dim % self.num_heads:
                raise ValueError(f"num_heads: the {name} width {dim} (hidden_size {hidden_size} x expand) is not "
                                 f"divisible by num_heads = {self.num_heads}")
        self.head_k_dim = self.key_dim // self.num_heads
        self.head_v_dim = self.value_dim // self.num_heads

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if self.use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, self.conv_size)
            self.k_conv1d = ShortConvolution(self.key_dim, self.conv_size)
            self.v_conv1d = ShortConvolution(self.value_dim, self.conv_size)

        self.decay = rec.decay
        self.decay_form = cfg.decay_form
        if rec.decay in (Decay.SCALAR, Decay.VECTOR):
            width = self.num_heads if rec.decay is Decay.SCALAR else self.key_dim
            if cfg.decay_form is DecayForm.GDN:
                self.a_proj = nn.Linear(hidden_size, self.num_heads, bias=False)
                a = torch.empty(self.num_heads).uniform_(0, 16)
                self.A_log = nn.Parameter(torch.log(a))
                dt_min, dt_max, dt_floor = 0.001, 0.1, 1e-4
                dt = torch.exp(torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
                dt = dt.clamp(min=dt_floor)
                self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
                self.A_log._no_weight_decay = True
                self.dt_bias._no_weight_decay = True
            elif cfg.decay_form is DecayForm.LOGSIGMOID:
                self.gk_proj = nn.Linear(hidden_size, width, bias=True)
            else:
                self.gk_proj = nn.Sequential(nn.Linear(hidden_size, cfg.decay_low_rank, bias=False),
                                             nn.Linear(cfg.decay_low_rank, width, bias=True))
            self.decay_normalizer = cfg.decay_normalizer
        self.beta_form = cfg.beta_form if rec.needs_beta else None
        if self.beta_form is not None:
            self.b_proj = nn.Linear(hidden_size, self.num_heads, bias=False)

        self.read_gate, self.write_gate = rec.gates.read, rec.gates.write
        if self.read_gate:
            self.gq_proj = nn.Linear(hidden_size, self.num_heads, bias=False)  # W_GQ
        if self.write_gate:
            self.gk_gate_proj = nn.Linear(hidden_size, self.num_heads, bias=False)  # W_GK

        self.output_norm = cfg.output_norm
        if cfg.output_norm is not OutputNorm.NONE:
            self.o_norm = HeadNorm(cfg.output_norm, self.num_heads, self.head_v_dim, self.norm_eps)
        self.output_gate = cfg.output_gate
        if cfg.output_gate is not OutputGate.NONE:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

        # With a per-head norm the read gate acts after it: the kernel runs the recurrence without it.
        self.read_gate_after_norm = self.read_gate and cfg.output_norm is not OutputNorm.NONE
        kernel_spec = spec
        if self.read_gate_after_norm:
            gates = Gates.WRITE if rec.gates.write else Gates.NONE
            kernel_spec = dataclasses.replace(spec, recurrence=dataclasses.replace(rec, gates=gates))
        self.kernel_spec = kernel_spec
        self.op = SpecOp(kernel_spec, backend)

    # -- pieces --------------------------------------------------------------------------------------------
    def head_gates(self, x: torch.Tensor):
        """(G^Q, G^K), each [B, T, H] float32 or None: softmax over heads of x W_GQ and x W_GK."""
        gq = torch.softmax(at_least_float32(self.gq_proj(x)), -1) if self.read_gate else None
        gk = torch.softmax(at_least_float32(self.gk_gate_proj(x)), -1) if self.write_gate else None
        return gq, gk

    def log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        batch, length = x.shape[:2]
        if self.decay not in (Decay.SCALAR, Decay.VECTOR):
            return None
        if self.decay_form is DecayForm.GDN:
            return -at_least_float32(self.A_log).exp() * F.softplus(at_least_float32(self.a_proj(x)) + self.dt_bias)
        g = F.logsigmoid(at_least_float32(self.gk_proj(x))) / self.decay_normalizer
        return g if self.decay is Decay.SCALAR else g.view(batch, length, self.num_heads, self.head_k_dim)

    def extra_repr(self) -> str:
        return (f"spec={self.spec.name!r}, hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"key_dim={self.key_dim}, value_dim={self.value_dim}, backend={self.op.backend!r}, "
                f"read_gate={'after norm' if self.read_gate_after_norm else 'fused' if self.read_gate else 'none'}")

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, past_state: dict | None = None, use_cache: bool = False):
        batch, length, _ = x.shape
        heads = self.num_heads
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("attention_mask: expected None with cu_seqlens (packed sequences have no padding)")
            if attention_mask.shape != (batch, length):
                raise ValueError(f"attention_mask: expected shape {[batch, length]} (1 = token, 0 = padding), got "
                                 f"shape {list(attention_mask.shape)}")
        mask = attention_mask.unsqueeze(-1) if attention_mask is not None else None  # [B, T, 1]

        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state = past_state.get("conv_state") if past_state is not None else None
        new_conv_state = None
        if self.use_short_conv:
            if mask is not None:  # padded positions feed zeros to the convolution
                m = mask.to(q.dtype)
                q, k, v = q * m, k * m, v * m
            caches = conv_state if conv_state is not None else (None, None, None)
            q, cq = self.q_conv1d(q, cache=caches[0], cu_seqlens=cu_seqlens, output_final_state=use_cache)
            k, ck = self.k_conv1d(k, cache=caches[1], cu_seqlens=cu_seqlens, output_final_state=use_cache)
            v, cv = self.v_conv1d(v, cache=caches[2], cu_seqlens=cu_seqlens, output_final_state=use_cache)
            new_conv_state = (cq, ck, cv) if use_cache else None
        q = q.view(batch, length, heads, self.head_k_dim)
        k = k.view(batch, length, heads, self.head_k_dim)
        v = v.view(batch, length, heads, self.head_v_dim)

        g = self.log_decay(x)
        beta = None
        if self.beta_form is not None:
            beta = torch.sigmoid(at_least_float32(self.b_proj(x)))
            if self.beta_form is BetaForm.SIGMOID2:
                beta = beta * 2.0
        gq, gk = self.head_gates(x)

        if mask is not None:  # padded tokens: no write, no decay
            m = mask.to(k.dtype).unsqueeze(-1)
            k, v = k * m, v * m
            m = at_least_float32(mask.to(x.dtype))
            if g is not None:
                g = g * (m if g.dim() == 3 else m.unsqueeze(-1))
            if beta is not None:
                beta = beta * m

        initial_state = past_state.get("recurrent_state") if past_state is not None else None
        o, final_state = self.op(q, k, v, g=g, beta=beta, gq=None if self.read_gate_after_norm else gq, gk=gk,
                                 initial_state=initial_state, output_final_state=use_cache, cu_seqlens=cu_seqlens)

        if self.output_norm is not OutputNorm.NONE:
            o = self.o_norm(o)
        if self.read_gate_after_norm:
            o = o * gq.unsqueeze(-1)
        if self.output_gate is not OutputGate.NONE:
            gate = self.g_proj(x).view(batch, length, heads, self.head_v_dim)
            o = o * (F.silu(gate) if self.output_gate is OutputGate.SWISH else torch.sigmoid(gate))
        o = o.to(x.dtype)
        y = self.o_proj(o.reshape(batch, length, self.value_dim))
        if use_cache:
            return y, {"recurrent_state": final_state, "conv_state": new_conv_state}
        return y
