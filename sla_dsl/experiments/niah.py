"""Synthetic needle in a haystack: one key -> value needle (the value a multi-token, UUID-like string) hidden at
a chosen depth in random tokens; at the end the key is asked again and the model must produce the value.

The vocabulary holds three disjoint ranges: `num_keys` key tokens, `value_alphabet` value tokens (16: hex
digits) and the haystack tokens (the rest). One example of T tokens, value length L, context length C = T - L:

    positions 0 .. C-1      haystack, uniform over the haystack tokens, with the needle  key v_1 .. v_L
                            starting at s = round(depth * (C - 1 - L)): depth 0 = the first token, depth 1 = the
                            needle ends right before the question
    position  C             the key again (the question)
    positions C+1 .. T-1    v_1 .. v_{L-1} (teacher forcing)
    labels                  v_1 .. v_L at positions C .. T-1, -100 elsewhere

The key appears exactly twice, so the answer is determined. All L labelled predictions right under teacher
forcing is the same event as greedy decoding producing the whole value: that is the example's exact match.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from sla_dsl.experiments.mqar import IGNORE


class NeedleBatch(NamedTuple):
    inputs: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64: the value at positions C .. T-1, IGNORE elsewhere
    needle_start: torch.Tensor  # [B] int64: position of the needle's key


@dataclasses.dataclass(frozen=True)
class NeedleInHaystack:
    vocab_size: int = 8192
    num_keys: int = 1024
    value_alphabet: int = 16
    value_len: int = 8

    def __post_init__(self):
        for name in ("num_keys", "value_alphabet", "value_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if len(self.haystack_tokens) < 1:
            raise ValueError(f"vocab_size: {self.vocab_size} leaves no haystack tokens after {self.num_keys} keys "
                             f"and {self.value_alphabet} value tokens")

    @property
    def keys(self) -> range:
        return range(0, self.num_keys)

    @property
    def value_tokens(self) -> range:
        return range(self.num_keys, self.num_keys + self.value_alphabet)

    @property
    def haystack_tokens(self) -> range:
        return range(self.num_keys + self.value_alphabet, self.vocab_size)

    def min_seq_len(self) -> int:
        return 2 * self.value_len + 1  # the needle and the question with its answer

    def needle_start(self, seq_len: int, depth: torch.Tensor) -> torch.Tensor:
        latest = seq_len - self.value_len - 1 - self.value_len  # C - 1 - L
        return torch.round(depth.double() * latest).long()

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator,
               depth: torch.Tensor | float | None = None) -> NeedleBatch:
        """`batch_size` examples of `seq_len` tokens on the generator's device; `depth` in [0, 1] (a number or
        one per example), drawn uniformly when None."""
        if seq_len < self.min_seq_len():
            raise ValueError(f"seq_len: expected at least {self.min_seq_len()} (2 x value_len + 1), got {seq_len}")
        device = generator.device
        if depth is None:
            depth = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
        else:  # checked only when given: a host sync per training batch would stall the GPU
            depth = torch.as_tensor(depth, dtype=torch.float64, device=device).expand(batch_size)
            if bool(((depth < 0) | (depth > 1)).any()):
                raise ValueError(f"depth: expected values in [0, 1], got min {depth.min().item()}, max "
                                 f"{depth.max().item()}")
        length = self.value_len
        context = seq_len - length
        hay = self.haystack_tokens
        inputs = torch.randint(hay.start, hay.stop, (batch_size, seq_len), generator=generator, device=device)
        key = torch.randint(self.keys.start, self.keys.stop, (batch_size, 1), generator=generator, device=device)
        value = torch.randint(self.value_tokens.start, self.value_tokens.stop, (batch_size, length),
                              generator=generator, device=device)
        start = self.needle_start(seq_len, depth)
        needle_positions = start.unsqueeze(1) + torch.arange(1 + length, device=device)
        inputs.scatter_(1, needle_positions, torch.cat([key, value], 1))
        inputs[:, context:context + 1] = key
        inputs[:, context + 1:] = value[:, :length - 1]
        labels = torch.full_like(inputs, IGNORE)
        labels[:, context:] = value
        return NeedleBatch(inputs, labels, start)
