"""Per-kernel GPU time of a call, from torch's profiler: which stage of a schedule takes the time, and which
kernels a change to one template moved (scripts/profile_kernels.py, scripts/ab_generated.py --kernels)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelTime:
    name: str
    ms: float  # GPU time per call, all its launches together
    launches: int  # per call


def per_call(events, repeats: int) -> list[KernelTime]:
    """Each GPU kernel of `repeats` profiled calls (torch.profiler's key_averages()), per call, slowest first.
    Events with no GPU time (the CPU side of launches) are left out."""
    rows = [KernelTime(e.key, e.device_time_total / repeats / 1e3, e.count // repeats)
            for e in events if e.device_time_total > 0 and e.count]
    return sorted(rows, key=lambda row: -row.ms)


def kernel_times(call, repeats: int = 10) -> list[KernelTime]:
    """The GPU kernels `call()` runs, each one's time per call averaged over `repeats` calls after one unprofiled
    call (compilation and caches stay outside)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            call()
        torch.cuda.synchronize()
    return per_call(prof.key_averages(), repeats)


def format_rows(rows: list[KernelTime], top: int) -> str:
    """The `top` slowest kernels, one line each."""
    return "\n".join(f"  {row.ms:8.3f} ms  {row.launches:3d}x  {row.name[:100]}" for row in rows[:top])
