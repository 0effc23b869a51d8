"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023), sampled on the fly on any device.

One example of `seq_len` tokens with n = `num_kv_pairs` pairs, the vocabulary split in half:

    positions 0 .. 2n-1     k_1 v_1 k_2 v_2 ... k_n v_n     keys from [1, V/2), values from [V/2, V), no
                                                           key and no value twice within an example
    positions 2n .. T-1     filler tokens, uniform over the whole vocabulary (as Zoology), except at the query
                            positions 2n + 2 g_i, which hold k_i: every key is queried once
    gaps g_i                distinct, from {0, ..., (T - 2n)/2 - 1}, P(g) proportional to (g + 1)^(a - 1) with
                            a = `power_a` (Zoology: 0.01): most queries come soon after the pairs, a long tail far
    labels                  -100 everywhere except at the query positions, where the label is the value bound
                            to the queried key: the model's next-token prediction there is its answer.

Labels are aligned with the inputs (labels[:, t] is what the model must predict after reading inputs[:, t]), as
`sla_dsl.nn.LanguageModel` expects.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

IGNORE = -100  # the label of positions that carry no loss (torch's cross-entropy default)


class Batch(NamedTuple):
    inputs: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE except at the answer positions


@dataclasses.dataclass(frozen=True)
class MQAR:
    seq_len: int
    num_kv_pairs: int
    vocab_size: int = 8192
    power_a: float = 0.01

    def __post_init__(self):
        if self.seq_len % 2:
            raise ValueError(f"seq_len: expected an even length (queries sit at every other position), got "
                             f"{self.seq_len}")
        if self.num_kv_pairs < 1 or 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"num_kv_pairs: expected 1 <= num_kv_pairs <= seq_len / 4 = {self.seq_len // 4} "
                             f"(room for the pairs and one distinct query gap per key), got {self.num_kv_pairs}")
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"vocab_size: {self.vocab_size} leaves {self.vocab_size // 2 - 1} keys, fewer than "
                             f"num_kv_pairs = {self.num_kv_pairs}")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a: expected 0 < power_a <= 1, got {self.power_a}")

    @property
    def keys(self) -> range:
        return range(1, self.vocab_size // 2)

    @property
    def values(self) -> range:
        return range(self.vocab_size // 2, self.vocab_size)

    @property
    def num_gaps(self) -> int:
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    def gap_probabilities(self, device=None) -> torch.Tensor:
        """P(g) for g = 0 .. num_gaps - 1 (one draw; the gaps of an example are drawn without replacement)."""
        ranks = torch.arange(1, self.num_gaps + 1, dtype=torch.float64, device=device)
        p = ranks ** (self.power_a - 1)
        return (p / p.sum()).float()

    def query_positions(self, gaps: torch.Tensor) -> torch.Tensor:
        return 2 * self.num_kv_pairs + 2 * gaps

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """`batch_size` examples on the generator's device."""
        device = generator.device
        n = self.num_kv_pairs
        # Distinct keys and values per example: the top n of iid uniforms is a uniformly random ordered subset.
        keys = torch.rand(batch_size, len(self.keys), generator=generator, device=device).topk(n).indices
        keys = keys + self.keys.start
        values = torch.rand(batch_size, len(self.values), generator=generator, device=device).topk(n).indices
        values = values + self.values.start
        gaps = torch.multinomial(self.gap_probabilities(device).expand(batch_size, -1).contiguous(), n,
                                 replacement=False, generator=generator)
        inputs = torch.randint(self.vocab_size, (batch_size, self.seq_len), generator=generator, device=device)
        inputs[:, 0:2 * n:2] = keys
        inputs[:, 1:2 * n:2] = values
        positions = self.query_positions(gaps)
        inputs.scatter_(1, positions, keys)
        labels = torch.full_like(inputs, IGNORE)
        labels.scatter_(1, positions, values)
        return Batch(inputs, labels)
