"""CPU tests of the benchmark harness: writers on synthetic rows, the CLI, the no-GPU exit."""

from __future__ import annotations

import json

import pytest
import torch

from sla_dsl import bench
from sla_dsl.autotune.shapes import Shape
from sla_dsl.cli import build_parser, main


def synthetic_rows():
    rows = []
    for b, t, k in ((8, 2048, 64), (4, 8192, 128), (1, 32768, 128)):
        shape = Shape(b, t, 16, k, k)
        for phase in ("fwd", "fwdbwd"):
            scale = t / 2048 * (3 if phase == "fwdbwd" else 1)
            rows.append(bench.make_row(bench.SDPA_SPEC, "sdpa", shape, phase, 0.5 * scale * t / 2048,
                                       backbone="sdpa"))
            for spec, backbone in (("gla", "gla"), ("sla_gla", "gla"), ("gdn", "gdn")):
                rows.append(bench.make_row(spec, "fla", shape, phase, 1.0 * scale, backbone=backbone,
                                           baseline_op="chunk_gla"))
                rows.append(bench.make_row(spec, "triton", shape, phase, 0.9 * scale, baseline="fla",
                                           baseline_ms=1.0 * scale, backbone=backbone, tuning="tuned (3 buckets)"))
                rows.append(bench.make_row(spec, "tilelang", shape, phase, None, baseline="fla",
                                           baseline_ms=1.0 * scale, backbone=backbone,
                                           error="RuntimeError: not built | yet"))
    return rows


def test_writers_on_synthetic_rows(tmp_path):
    rows = synthetic_rows()
    meta = {"device": "NVIDIA H100 80GB HBM3", "date": "2025-01-01 00:00 UTC", "command": "python -m sla_dsl bench",
            "versions": {"torch": "2.11", "triton": "3.6", "tilelang": "0.1.15", "fla": "0.6.0"}, "wall_s": 1.0}
    paths = bench.write_all(rows, tmp_path / "out", meta)
    assert [p.name for p in paths] == ["bench.json", "bench.md", "bench.png"]
    loaded = json.loads(paths[0].read_text())
    assert loaded == rows
    for row in loaded:
        assert set(bench.ROW_KEYS) <= set(row)
        assert row["phase"] in ("fwd", "fwdbwd") and row["baseline"] in ("fla", "sdpa", "none")
    md = paths[1].read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "fla 0.6.0" in md and "tilelang 0.1.15" in md
    assert "`python -m sla_dsl bench`" in md
    assert "| gla | triton | 4x8192x16x128x128 | fwd | 3.600 | 4.000 | 0.90x | 8.000 |" in md
    assert "ERROR: RuntimeError: not built / yet" in md  # errors stay rows; '|' cannot break the table
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[2].stat().st_size > 10_000


def test_merge_combines_runs_split_by_shape_and_a_later_row_wins(tmp_path):
    """A benchmark split over runs (one shape per device call): one table and plot over every shape, each row
    as its own run measured it, and every run's date and command in bench.md."""
    rows = synthetic_rows()
    meta = {"device": "NVIDIA H100 80GB HBM3", "command": "python -m sla_dsl bench", "wall_s": 1.0,
            "warmup_ms": 25.0, "rep_ms": 100.0, "versions": {"fla": "0.6.0"}}
    small = [r for r in rows if r["T"] == 2048]
    rest = [r for r in rows if r["T"] != 2048]
    retimed = dict(small[0], ms=0.123)  # the second run measured this row again
    bench.write_all(small, tmp_path / "a", {**meta, "date": "2025-01-01 00:00 UTC"})
    bench.write_all(rest + [retimed], tmp_path / "b", {**meta, "date": "2025-01-02 00:00 UTC"})
    paths = bench.merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "merged", "python -m sla_dsl bench --merge a b")
    merged = json.loads(paths[0].read_text())
    assert len(merged) == len(rows) and retimed in merged and small[0] not in merged
    md = paths[1].read_text()
    assert "2025-01-01 00:00 UTC" in md and "2025-01-02 00:00 UTC" in md and "from 2 runs" in md
    assert "| gla | triton | 8x2048x16x64x64 | fwd | 0.900 |" in md and "| gla | triton | 1x32768" in md
    assert paths[2].name == "bench.png"
    # a folder limited to some specs contributes only their rows
    paths = bench.merge_runs([tmp_path / "a", f"{tmp_path / 'b'}:sla_gla"], tmp_path / "some", "x")
    merged = json.loads(paths[0].read_text())
    assert {r["T"] for r in merged if r["spec"] == "gla"} == {2048}
    assert {r["T"] for r in merged if r["spec"] == "sla_gla"} == {2048, 8192, 32768}
    assert "differs between the merged runs" not in md  # one fla time per workload
    # two runs whose fla times for one workload differ: the merged table says so
    slower_fla = [dict(r, baseline_ms=r["baseline_ms"] * 1.5) for r in small if r["baseline"] == "fla"]
    other = next(r for r in slower_fla if r["backend"] == "triton")
    bench.write_all([other], tmp_path / "c", {**meta, "date": "2025-01-03 00:00 UTC"})
    md = bench.merge_runs([tmp_path / "a", tmp_path / "c"], tmp_path / "spread", "x")[1].read_text()
    assert "differs between the merged runs by more than 1.2x on 1 row(s)" in md
    assert f"  - {other['spec']} 8x2048x16x64x64 {other['dtype']} {other['phase']}: fla " in md
    with pytest.raises(FileNotFoundError, match="no bench.json"):
        bench.merge_runs([tmp_path / "missing"], tmp_path / "merged", "x")
    assert main(["bench", "--merge", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2


def test_plot_with_only_errors_still_writes(tmp_path):
    rows = [bench.make_row("gla", "triton", (1, 64, 2, 16, 16, "bfloat16"), "fwd", None, error="x")]
    bench.write_plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").exists()


def test_cli_parses_bench_autotune_and_first_call():
    parser = build_parser()
    args = parser.parse_args(["bench", "--backends", "triton", "--specs", "gla", "sla_gla", "--phases", "fwd",
                              "--shapes", "4x8192x16x128", "--quick", "--out", "x"])
    assert args.backends == "triton" and args.specs == ["gla", "sla_gla"] and args.quick and args.run
    args = parser.parse_args(["autotune", "--spec", "specs/gla.yaml", "--backend", "triton", "--budget-seconds",
                              "60", "--shapes", "4x8192x16x128"])
    assert args.spec == ["specs/gla.yaml"] and args.budget_seconds == 60 and args.backend == "triton"
    args = parser.parse_args(["first-call", "--spec", "specs/gla.yaml", "--backend", "triton"])
    assert args.shape == "4x8192x16x128" and args.child is None


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--quick"], ["autotune"],
                                  ["first-call", "--spec", "gla"]])
def test_without_cuda_exits_2_with_a_message(argv, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_cpu_smoke_run_reports_failures_as_rows(tmp_path):
    """The whole harness on CPU with the reference backend; a backend that cannot build and a missing fla
    become rows with errors, never the end of the run."""
    out = tmp_path / "bench"
    code = main(["bench", "--device", "cpu", "--backends", "reference,nosuchbackend", "--specs", "sla_gla",
                 "--shapes", "1x32x2x8", "--dtype", "float32", "--no-fla", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "bench.json").read_text())
    ours = [r for r in rows if r["backend"] == "reference"]
    assert len(ours) == 2 and all(r["ms"] > 0 and r["spec"] == "sla_gla" for r in ours)
    assert all(r["ms"] is None and r["error"] for r in rows if r["backend"] == "nosuchbackend")
    assert {r["phase"] for r in rows if r["backend"] == "sdpa"} == {"fwd", "fwdbwd"}
    assert (out / "bench.md").exists() and (out / "bench.png").exists()
