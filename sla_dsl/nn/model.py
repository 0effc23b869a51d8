"""A small causal language model around `SpecAttention`: embeddings, pre-norm blocks of RMSNorm + SpecAttention
+ RMSNorm + SwiGLU MLP, a final RMSNorm and a head tied to the embeddings."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sla_dsl.nn.layers import SpecAttention, at_least_float32, resolve_spec


@dataclasses.dataclass
class LMConfig:
    spec: str = "specs/sla_gla.yaml"  # path of the spec file (kept a string: the config is JSON)
    vocab_size: int = 256  # bytes
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int | None = None  # None: the spec's layer.num_heads
    intermediate_size: int | None = None  # SwiGLU width; None: 8/3 hidden rounded up to a multiple of 64
    use_short_conv: bool | None = None  # None: the spec's
    norm_eps: float = 1e-5
    backend: str = "auto"
    tie_embeddings: bool = True
    initializer_range: float = 0.02

    def resolved_intermediate_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 64 * math.ceil(self.hidden_size * 8 / 3 / 64)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = at_least_float32(x)
        return (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LMConfig, spec, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = SpecAttention(spec, config.hidden_size, config.num_heads, use_short_conv=config.use_short_conv,
                                  backend=config.backend, layer_idx=layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.resolved_intermediate_size())

    def forward(self, x, attention_mask=None, cu_seqlens=None, past_state=None, use_cache=False):
        out = self.attn(self.attn_norm(x), attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                        past_state=past_state, use_cache=use_cache)
        state = None
        if use_cache:
            out, state = out
        x = x + out
        x = x + self.mlp(self.mlp_norm(x))
        return x, state


class LMOutput(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor | None
    past_states: list | None


class LanguageModel(nn.Module):
    """forward(input_ids [B, T], labels=None, attention_mask=None, cu_seqlens=None, past_states=None,
    use_cache=False) -> LMOutput(logits [B, T, vocab] float32, loss, past_states).

    `labels` are the targets already aligned with the inputs (labels[:, t] is the token after input_ids[:, t]);
    -100 is ignored. The loss is the mean cross entropy over the labelled positions.

    `labelled_logits_only=True` (with labels) computes the head only at the labelled positions: logits are then
    [number of labelled positions, vocab], in row-major (b, t) order. For tasks scored on a few positions (MQAR's
    queries) this skips most of the head and its softmax: on the H100 those were ~8 of a 24 ms training step of
    a width-128 MQAR model at batch 256 x T 256."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        spec = resolve_spec(config.spec)
        self.spec = spec
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, spec, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_layers)  # GPT-2: scaled residual projections
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith("attn.o_proj") or name.endswith("mlp.down_proj")
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def forward(self, input_ids, labels=None, attention_mask=None, cu_seqlens=None, past_states=None,
                use_cache=False, labelled_logits_only=False) -> LMOutput:
        x = self.embed(input_ids)
        states = [] if use_cache else None
        for i, block in enumerate(self.blocks):
            x, state = block(x, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                             past_state=past_states[i] if past_states is not None else None, use_cache=use_cache)
            if use_cache:
                states.append(state)
        if labelled_logits_only:
            if labels is None:
                raise ValueError("labelled_logits_only: needs labels (the positions whose logits are computed)")
            keep = labels != -100
            x, labels = x[keep], labels[keep]
        logits = at_least_float32(self.head(self.norm(x)))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return LMOutput(logits, loss, states)
