"""Batches of token windows, a pure function of (seed, step, rank): resuming at a step, or splitting a batch
over ranks, reads exactly the tokens an uninterrupted single-process run would.

Training: a window is `seq_len + 1` tokens (inputs and the next-token labels). Epoch e draws, from a
generator seeded by (seed, e), an offset in [0, seq_len) and a permutation of the epoch's windows (at stride
seq_len from that offset), so epochs see shifted, reordered windows. Global step s takes the windows at
positions [s * G, (s + 1) * G) of the endless sequence of epochs, G = batch_size * world_size; rank r takes
its batch_size consecutive ones. So the global batch of a step does not depend on the number of ranks.

Evaluation: `eval_windows` spreads a fixed number of windows evenly over the held-out tokens.
"""

from __future__ import annotations

import torch


class TrainBatches:
    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size: expected positive integers, got {seq_len} and {batch_size}")
        windows = (tokens.numel() - seq_len) // seq_len  # fits every offset in [0, seq_len)
        if windows < 1:
            raise ValueError(f"seq_len: expected at most {tokens.numel() // 2} for a corpus of {tokens.numel()} "
                             f"tokens, got {seq_len}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.windows_per_epoch = windows
        self._epoch: tuple[int, int, torch.Tensor] | None = None  # (epoch, offset, permutation), the last used

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _epoch_order(self, epoch: int) -> tuple[int, torch.Tensor]:
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            offset = int(torch.randint(self.seq_len, (1,), generator=gen))
            self._epoch = (epoch, offset, torch.randperm(self.windows_per_epoch, generator=gen))
        return self._epoch[1], self._epoch[2]

    def starts(self, step: int) -> torch.Tensor:
        """Start offsets (in `tokens`) of this rank's windows at `step`."""
        first = step * self.global_batch + self.rank * self.batch_size
        starts = []
        for position in range(first, first + self.batch_size):
            epoch, index = divmod(position, self.windows_per_epoch)
            offset, order = self._epoch_order(epoch)
            starts.append(offset + int(order[index]) * self.seq_len)
        return torch.tensor(starts)

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each int64 [batch_size, seq_len], of this rank at `step`."""
        return windows_at(self.tokens, self.starts(step), self.seq_len)

    def state_dict(self) -> dict:
        """What decides the batches besides the step: a resumed run must match it."""
        return {"seed": self.seed, "seq_len": self.seq_len, "global_batch": self.global_batch,
                "corpus_tokens": int(self.tokens.numel())}


def windows_at(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = starts.unsqueeze(1) + torch.arange(seq_len + 1)
    window = tokens[index].long()
    return window[:, :-1], window[:, 1:]


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Start offsets of at most max_tokens // seq_len windows spread evenly over `tokens`."""
    available = (tokens.numel() - 1) // seq_len
    count = min(available, max(1, max_tokens // seq_len))
    if available < 1:
        raise ValueError(f"seq_len: expected at most {tokens.numel() - 1} for {tokens.numel()} held-out tokens, "
                         f"got {seq_len}")
    return (torch.arange(count) * available // count) * seq_len
