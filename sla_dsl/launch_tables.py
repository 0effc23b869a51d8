"""The small device tables a kernel launch reads besides its inputs, shared by both backends: the chunk tables
(which sequence and which chunk of it each program of a chunk-parallel stage works on), a constant decay's
per-head log gammas, and scalars passed as tensors.

Anything copied from the host per call (torch.tensor of a list, .item()) waits for the GPU's queue to drain.

For packed variable lengths (cu_seqlens) the number of chunks depends on the lengths on the device, so building
the tables costs one device-to-host copy per call, as in fla. Equal lengths (cu_seqlens None, B sequences of T
tokens) need no sync at all: the tables follow from (B, T, chunk) alone, and are built once per device and
cached. That wait is what made a call's host time exceed its GPU time: on the H100, retnet's forward at
(4, 8192, 16, 128) ran its kernels in 0.88 ms but took 1.42 ms per call, the launches waiting on the copy.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from sla_dsl.spec import Recurrence


@dataclasses.dataclass(frozen=True)
class ChunkTable:
    cu_seqlens: torch.Tensor  # [N + 1] int64: sequence boundaries in the packed token axis
    chunk_offsets: torch.Tensor  # [N + 1] int64: index of each sequence's first chunk (and the total last)
    chunk_indices: torch.Tensor  # [num_chunks, 2] int32: (sequence, chunk within the sequence) per chunk
    num_sequences: int
    num_chunks: int


def chunk_table(batch: int, length: int, cu_seqlens: torch.Tensor | None, chunk: int,
                device: torch.device) -> ChunkTable:
    if cu_seqlens is None:
        return _equal_lengths(batch, length, chunk, torch.device(device))
    cu = cu_seqlens.to(device=device, dtype=torch.int64).contiguous()
    counts = (cu[1:] - cu[:-1] + chunk - 1) // chunk
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    offsets[1:] = counts.cumsum(0)
    num_chunks = int(offsets[-1].item())  # the one sync: the grid size of the chunk-parallel stages
    seq = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts, output_size=num_chunks)
    local = torch.arange(num_chunks, device=device) - offsets[seq]
    return ChunkTable(cu, offsets, torch.stack([seq, local], 1).to(torch.int32).contiguous(), counts.numel(),
                      num_chunks)


@functools.lru_cache(maxsize=64)
def _equal_lengths(batch: int, length: int, chunk: int, device: torch.device) -> ChunkTable:
    per_seq = -(-length // chunk)
    num_chunks = batch * per_seq
    cu = torch.arange(batch + 1, dtype=torch.int64, device=device) * length
    offsets = torch.arange(batch + 1, dtype=torch.int64, device=device) * per_seq
    index = torch.arange(num_chunks, dtype=torch.int64, device=device)
    indices = torch.stack([index // max(per_seq, 1), index % max(per_seq, 1)], 1).to(torch.int32).contiguous()
    return ChunkTable(cu, offsets, indices, batch, num_chunks)


@functools.lru_cache(maxsize=64)
def log_gammas(rec: Recurrence, heads: int, device: torch.device) -> torch.Tensor:
    """A constant decay's natural-log gamma per head, [heads] float32, copied to the device once."""
    return torch.tensor(rec.log_gammas(heads), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=64)
def scalar(value: float, device: torch.device) -> torch.Tensor:
    """[1] float32 holding `value`: the same tensor for every call with that value."""
    return torch.tensor([value], dtype=torch.float32, device=device)
