"""The process group of a training run: one process, or one per GPU under `torchrun` (nccl on CUDA, gloo on
CPU). torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) decides."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world_size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup(device: str | None = None) -> Distributed:
    """Joins the process group when WORLD_SIZE > 1. `device`: 'cuda' or 'cpu' (None: cuda when there is
    one); under torchrun each rank takes the GPU of its LOCAL_RANK."""
    kind = torch.device(device or default_device()).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: expected cpu on this machine (torch.cuda.is_available() is False), got cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", local_rank) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo",
                                device_id=target if kind == "cuda" else None)
    return Distributed(rank=rank, world_size=world_size, device=target)


def teardown(group: Distributed) -> None:
    if group.active and dist.is_initialized():
        dist.destroy_process_group()
