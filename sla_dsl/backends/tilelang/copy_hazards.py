"""Asynchronous copies into a shared buffer that a tensor-core gemm may still be reading, read from the CUDA source
TileLang emits.

A pipelined loop (T.Pipelined) issues the next chunk's T.copy into a shared buffer (cp.async) right after the
buffer's last reader in the loop body. When that reader is a T.gemm (wgmma, which reads shared memory through a
descriptor), TileLang's barrier placement does not see the read: each warpgroup waits for its own wgmma only, so
with two or more warpgroups one can overwrite the buffer while another's gemm still reads it. On the H100 a
variant of the fused forward (states_output) in which a gemm was the last reader of its copy of q got rows 8-15 of
every 16 of its output wrong, at random, in one config of six (benchmarks/NVIDIA_H100_80GB_HBM3/2026-11-24-session20/
fused-diag.log). An element-wise reader of the buffer in the loop body is seen, and the barrier is placed before
the next copy into it, and before the copies issued after that one: the fused forward orders its copies so
(generator._states_output_pieces).

`hazards(source)` lists every cp.async into a buffer that a wgmma read (through a descriptor of it) since the
last __syncthreads() before it, in the order of the source (a copy at the top of a loop body is not checked against
the gemms at its bottom). A kernel of one warpgroup (128 threads) has none to fear: its threads wait for their
own wgmma before they copy.
"""

from __future__ import annotations

import dataclasses
import re

_BARRIER = "__syncthreads()"
# initialize_wgmma_descriptor<...>(desc, (&(((element*)NAME)[...]))): the descriptor of a buffer
_DESCRIPTOR = re.compile(r"initialize_wgmma_descriptor<[^>]*>\((\w+), \(&\(\(\(\w+\*\)(\w+)\)\[")
_WGMMA = re.compile(r"\bwgmma_\w+<")
_NAME = re.compile(r"\b\w+\b")
# cp_async_gs[_conditional]<bytes>((&(((element*)NAME)[...
_ASYNC_COPY = re.compile(r"cp_async_gs(?:_conditional)?<\d+>\(\(&\(\(\(\w+\*\)(\w+)\)\[")


@dataclasses.dataclass(frozen=True)
class Hazard:
    buffer: str
    gemm_line: int  # 1-based lines of the source
    copy_line: int

    def __str__(self) -> str:
        return (f"cp.async into {self.buffer} (line {self.copy_line}) after a wgmma read of it (line "
                f"{self.gemm_line}) with no __syncthreads() between")


def hazards(source: str) -> list[Hazard]:
    found = []
    buffer_of: dict[str, str] = {}  # descriptor -> the buffer it addresses
    read_since_barrier: dict[str, int] = {}
    for number, line in enumerate(source.splitlines(), 1):
        if _BARRIER in line:
            read_since_barrier.clear()
        buffer_of.update(_DESCRIPTOR.findall(line))
        if _WGMMA.search(line):
            for name in _NAME.findall(line):
                if name in buffer_of:
                    read_since_barrier[buffer_of[name]] = number
        for buffer in _ASYNC_COPY.findall(line):
            if buffer in read_since_barrier:
                found.append(Hazard(buffer, read_since_barrier[buffer], number))
    return found
