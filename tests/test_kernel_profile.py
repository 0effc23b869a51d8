"""sla_dsl.kernel_profile: per-kernel times per call from the profiler's averaged events (the profiling itself
needs a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

from sla_dsl.kernel_profile import KernelTime, format_rows, per_call


def event(key: str, device_us: float, count: int):
    return SimpleNamespace(key=key, device_time_total=device_us, count=count)


def test_per_call_divides_by_the_calls_and_leaves_out_events_without_gpu_time():
    events = [event("cudaLaunchKernel", 0.0, 40), event("gdn_states_kernel", 9340.0, 20),
              event("gdn_bwd_chunk_kernel", 15760.0, 10), event("Activity Buffer Request", 5.0, 0)]
    rows = per_call(events, repeats=10)
    assert rows == [KernelTime("gdn_bwd_chunk_kernel", 1.576, 1), KernelTime("gdn_states_kernel", 0.934, 2)]
    text = format_rows(rows, top=1)
    assert "gdn_bwd_chunk_kernel" in text and "1.576 ms" in text and "gdn_states" not in text
