"""CPU tests of the tuned tables, their lookup and the sweep driver (fake kernels, fake timings)."""

from __future__ import annotations

import json
import multiprocessing
import warnings
from pathlib import Path

import pytest
import torch

from sla_dsl.autotune import table
from sla_dsl.autotune.protocol import ConfigRejected, resolve_config
from sla_dsl.autotune.runner import Configured, verify_config
from sla_dsl.autotune.shapes import Shape, bucket, nearest, parse_shape, parse_shapes, reference_shapes
from sla_dsl.autotune.sweep import Task, is_fatal, is_skippable, sweep
from sla_dsl.backends.reference import ReferenceKernels
from sla_dsl.codegen import SEED_SPECS_DIR
from sla_dsl.loader import load_spec

GPU = "Fake_GPU_80GB"
HASH = "0123456789abcdef" * 4


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """An empty table root, a fixed source hash, and a clean lookup cache."""
    monkeypatch.setenv("SLA_DSL_AUTOTUNE_DIR", str(tmp_path))
    monkeypatch.delenv("SLA_DSL_AUTOTUNE", raising=False)
    monkeypatch.setattr(table, "source_hash", lambda spec, backend: HASH)
    table.clear_cache()
    yield tmp_path
    table.clear_cache()


@pytest.fixture(scope="module")
def gla():
    return load_spec(SEED_SPECS_DIR / "gla.yaml")


def write(root, spec, entries, source=HASH, backend="triton"):
    path = table.table_path(GPU, backend, spec.name, root)
    table.update_table(path, spec_name=spec.name, spec_sha256=spec.source_sha256, backend=backend, gpu=GPU,
                       source_sha256=source, entries=entries)
    return path


def entry(shape: Shape, fwd: dict | None = None, bwd: dict | None = None) -> dict:
    out = {"shape": shape.as_dict()}
    if fwd is not None:
        out["fwd"] = {"config": fwd, "ms": 1.0}
    if bwd is not None:
        out["bwd"] = {"config": bwd, "ms": 2.0}
    return {shape.bucket().key: out}


def autotune_warnings(record):
    return [w for w in record if issubclass(w.category, table.AutotuneWarning)]


# --- shapes ------------------------------------------------------------------------------------------------

def test_bucket_rounds_b_h_up_and_t_to_nearest_power_of_two():
    assert bucket(Shape(3, 6000, 12, 128, 128)) == Shape(4, 8192, 16, 128, 128)
    assert bucket(Shape(4, 5000, 16, 64, 64)) == Shape(4, 4096, 16, 64, 64)
    assert bucket(Shape(1, 3, 1, 64, 64)).T == 16
    assert Shape.from_key(Shape(2, 1024, 8, 64, 128, "float16", True).key) == Shape(2, 1024, 8, 64, 128, "float16", True)


def test_nearest_bucket_needs_same_k_v_dtype_and_prefers_close_t():
    stored = [Shape(4, 8192, 16, 128, 128), Shape(1, 32768, 16, 128, 128), Shape(8, 2048, 16, 64, 64)]
    assert nearest(Shape(4, 7000, 16, 128, 128), stored) == stored[0]
    assert nearest(Shape(2, 30000, 16, 128, 128), stored) == stored[1]
    assert nearest(Shape(16, 512, 16, 64, 64), stored) == stored[2]
    assert nearest(Shape(4, 8192, 16, 256, 256), stored) is None
    assert nearest(Shape(4, 8192, 16, 128, 128, "float16"), stored) is None
    # varlen prefers a varlen bucket at equal distance otherwise
    both = [Shape(4, 8192, 16, 128, 128), Shape(4, 8192, 16, 128, 128, varlen=True)]
    assert nearest(Shape(4, 8192, 16, 128, 128, varlen=True), both).varlen


def test_shape_of_tensors_and_parsing():
    q, v = torch.zeros(1, 300, 2, 8), torch.zeros(1, 300, 2, 16)
    assert Shape.of(q, v) == Shape(1, 300, 2, 8, 16, "float32")
    assert Shape.of(q, v, torch.tensor([0, 100, 300])) == Shape(2, 150, 2, 8, 16, "float32", True)
    assert parse_shape("4x8192x16x128") == Shape(4, 8192, 16, 128, 128)
    assert parse_shape("1x64x2x32x64:fp16:varlen") == Shape(1, 64, 2, 32, 64, "float16", True)
    assert parse_shapes(None) == reference_shapes()
    with pytest.raises(ValueError):
        parse_shape("4x8192")


# --- tables ------------------------------------------------------------------------------------------------

def test_atomic_write_reads_back_with_stable_key_order(tables, gla):
    shape = Shape(4, 8192, 16, 128, 128)
    path = write(tables, gla, entry(shape, fwd={"num_warps": 4, "block_k": 64, "chunk_size": 64}))
    text = path.read_text()
    data = json.loads(text)
    assert text == table.dumps(data)  # sorted keys, canonical indentation
    assert list(data) == sorted(data)
    assert list(data["entries"][shape.key]["fwd"]["config"]) == ["block_k", "chunk_size", "num_warps"]
    assert data["source_sha256"] == HASH and data["gpu"] == GPU and set(data["versions"]) >= {"torch", "triton",
                                                                                             "tilelang", "sla_dsl"}
    # merging keeps the other phase and other buckets; no temporary files are left behind
    write(tables, gla, entry(shape, bwd={"num_warps": 8}))
    write(tables, gla, entry(Shape(8, 2048, 16, 64, 64), fwd={"num_warps": 2}))
    data = table.read_table(path)
    assert set(data["entries"][shape.key]) == {"shape", "fwd", "bwd"} and len(data["entries"]) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["gla.json", "gla.json.lock"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert table.lookup(gla, "triton", Shape(4, 6000, 16, 128, 128), gpu=GPU) == {
            "num_warps": 4, "block_k": 64, "chunk_size": 64}
        assert table.lookup(gla, "triton", shape, phase="bwd", gpu=GPU) == {"num_warps": 8}
        assert table.lookup(gla, "triton", Shape(8, 2048, 16, 64, 64), phase="bwd", gpu=GPU) is None
        assert table.lookup(gla, "triton", Shape(1, 64, 1, 32, 32), gpu=GPU) is None
    assert autotune_warnings(record) == []


def test_stale_entries_are_dropped_when_the_source_changes(tables, gla):
    write(tables, gla, entry(Shape(4, 8192, 16, 128, 128), fwd={"a": 1}), source="old" * 20)
    path = write(tables, gla, entry(Shape(8, 2048, 16, 64, 64), fwd={"a": 2}))
    assert list(table.read_table(path)["entries"]) == [Shape(8, 2048, 16, 64, 64).key]


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "wrong-structure", "empty"])
def test_corrupt_or_truncated_table_warns_once_and_gives_none(tables, gla, damage):
    path = write(tables, gla, entry(Shape(4, 8192, 16, 128, 128), fwd={"num_warps": 4}))
    text = path.read_text()
    path.write_text({"corrupt": "{not json at all", "truncated": text[: len(text) // 2],
                     "wrong-structure": json.dumps({"format": 1, "spec": "gla", "backend": "triton",
                                                    "source_sha256": HASH, "entries": {"B1": []}}),
                     "empty": ""}[damage])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            assert table.lookup(gla, "triton", Shape(4, 8192, 16, 128, 128), gpu=GPU) is None
    found = autotune_warnings(record)
    assert len(found) == 1 and "unreadable" in str(found[0].message) and "autotune" in str(found[0].message)


def test_source_hash_mismatch_warns_once_and_gives_none(tables, gla):
    write(tables, gla, entry(Shape(4, 8192, 16, 128, 128), fwd={"num_warps": 4}), source="f" * 64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert table.lookup(gla, "triton", Shape(4, 8192, 16, 128, 128), gpu=GPU) is None
        assert table.lookup(gla, "triton", Shape(4, 8192, 16, 128, 128), phase="bwd", gpu=GPU) is None
    found = autotune_warnings(record)
    assert len(found) == 1 and "other generated kernels" in str(found[0].message)


def test_missing_gpu_table_warns_exactly_once_naming_the_command(tables, gla):
    gdn = load_spec(SEED_SPECS_DIR / "gdn.yaml")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for shape in reference_shapes():
            for phase in ("fwd", "bwd"):
                assert table.lookup(gla, "triton", shape, phase=phase, gpu="Other_GPU") is None
                assert table.lookup(gdn, "triton", shape, phase=phase, gpu="Other_GPU") is None
    found = autotune_warnings(record)
    assert len(found) == 1
    assert "python -m sla_dsl autotune --spec specs/gla.yaml --backend triton" in str(found[0].message)


def test_lookup_is_off_without_cuda_or_when_disabled(tables, gla, monkeypatch):
    write(tables, gla, entry(Shape(4, 8192, 16, 128, 128), fwd={"num_warps": 4}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert table.lookup(gla, "triton", Shape(4, 8192, 16, 128, 128)) is None
        monkeypatch.setenv("SLA_DSL_AUTOTUNE", "0")
        assert table.lookup(gla, "triton", Shape(4, 8192, 16, 128, 128), gpu=GPU) is None


def _hammer(args):
    root, worker = args
    spec = load_spec(SEED_SPECS_DIR / "gla.yaml")
    for i in range(15):
        write(Path(root), spec, entry(Shape(1 + worker, 64 << i, 16, 64, 64), fwd={"w": worker, "i": i}))


def test_two_processes_writing_at_once_leave_a_whole_merged_file(tables, gla):
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        pool.map(_hammer, [(str(tables), 0), (str(tables), 3)])
    data = table.read_table(table.table_path(GPU, "triton", "gla", tables))
    assert len(data["entries"]) == 30


# --- the protocol and the sweep ------------------------------------------------------------------------------

class FakeKernels(ReferenceKernels):
    """The reference backend with the tuning protocol; config 'wrong' scales o, block 256 fails to compile."""

    def __init__(self, spec):
        super().__init__(spec)
        self.calls = []

    def tuning_space(self, shape, phase="fwd"):
        space = [{"block": b, "num_warps": w, "wrong": False} for b in (32, 64, 256) for w in (2, 4)]
        return space + [{"block": 128, "num_warps": 8, "wrong": True}]

    def default_config(self, shape, phase="fwd"):
        return {"block": 32, "num_warps": 4, "wrong": False}

    def _check(self, config):
        if config["block"] == 256:
            raise type("CompilationError", (Exception,), {})("ptxas: too much shared memory")

    def forward(self, *args, config=None):
        self.calls.append(("fwd", config))
        if config is not None:
            self._check(config)
        o, final = super().forward(*args)
        return (o * 1.01, final) if config is not None and config["wrong"] else (o, final)

    def backward(self, *args, config=None):
        self.calls.append(("bwd", config))
        if config is not None:
            self._check(config)
        grads = super().backward(*args)
        return tuple(g * 1.01 if g is not None and config is not None and config["wrong"] else g for g in grads)


FAKE_MS = {(32, 2): 5.0, (32, 4): 4.0, (64, 2): 3.0, (64, 4): 2.5, (256, 2): 0.1, (256, 4): 0.1, (128, 8): 1.0}


def fake_measure(task, config, precise=False):
    """Runs the config once on a tiny CPU input (so compile errors surface), returns a fake time."""
    from sla_dsl.testing import make_inputs

    rec = task.spec.recurrence
    inputs = make_inputs(rec, 1, 8, 2, task.shape.K, task.shape.V, initial_state=False)
    args = [inputs.get(n) for n in ("q", "k", "v", "g", "beta", "gq", "gk")] + [None]
    if task.phase == "fwd":
        task.kernels.forward(*args, None, 0.5, False, config=config)
    else:
        task.kernels.backward(*args, None, 0.5, torch.randn(1, 8, 2, task.shape.V), None, config=config)
    return FAKE_MS[(config["block"], config["num_warps"])] * (0.9 if precise else 1.0)


def test_sweep_skips_compile_errors_rejects_wrong_winners_and_writes_verified_configs(tables, gla):
    kernels = FakeKernels(gla)
    shape = Shape(2, 64, 2, 8, 8, "float32")
    tasks = [Task(kernels, gla, "triton", shape, phase) for phase in ("fwd", "bwd")]
    written = []

    def on_result(result):
        written.append(result)
        write(tables, gla, {shape.bucket().key: {"shape": shape.as_dict(),
                                                 result.task.phase: result.entry()}})

    report = sweep(tasks, measure=fake_measure, verify=lambda t, c: verify_config(t, c, device="cpu"),
                   budget_seconds=60, on_result=on_result)
    assert report.aborted is None and len(written) == 2
    for result in report.results:
        assert result.space == 7 and result.tried == 5 and result.skipped == 2 and result.failed == 0
        assert result.rejected == 1  # the fast-but-wrong config failed the reference check
        assert result.config == {"block": 64, "num_warps": 4, "wrong": False}
        assert result.ms == pytest.approx(2.25) and result.default_ms == pytest.approx(3.6)
        assert result.verified["o"] < 1e-5
    assert set(report.results[1].verified) >= {"o", "dq", "dk", "dv", "dg"}
    assert "skipped 4 (compile/resources)" in report.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert table.lookup(gla, "triton", shape, phase="bwd", gpu=GPU) == {"block": 64, "num_warps": 4,
                                                                             "wrong": False}


def test_sweep_budget_always_times_the_default_and_counts_the_rest_unexplored(gla):
    kernels = FakeKernels(gla)
    ticks = iter(range(0, 10_000, 100))
    report = sweep([Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")],
                   measure=fake_measure, verify=lambda t, c: (True, {}), budget_seconds=1,
                   clock=lambda: next(ticks))
    result = report.results[0]
    assert result.tried == 1 and result.unexplored == 6 and result.config == kernels.default_config(None)


def test_sweep_reports_when_no_config_passes(gla):
    kernels = FakeKernels(gla)
    report = sweep([Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")],
                   measure=fake_measure, verify=lambda t, c: (False, {"o": 1.0}), budget_seconds=30)
    assert report.results[0].config is None and "NOT WRITTEN" in report.summary()


def test_error_classification():
    assert is_skippable(ConfigRejected("too big"))
    assert is_skippable(RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory"))
    assert not is_skippable(ValueError("shape mismatch"))
    assert is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_resolve_config_prefers_given_then_valid_table_then_default(tables, gla, monkeypatch):
    kernels = FakeKernels(gla)
    shape = Shape(2, 64, 2, 8, 8, "float32")
    write(tables, gla, entry(shape, fwd={"block": 64, "num_warps": 2, "wrong": False},
                             bwd={"block": 999, "num_warps": 1, "wrong": False}))
    monkeypatch.setattr(table, "gpu_name", lambda device=None: GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_config(kernels, gla, "triton", shape, "fwd", {"x": 1}) == {"x": 1}
    assert resolve_config(kernels, gla, "triton", shape, "fwd") == {"block": 64, "num_warps": 2, "wrong": False}
    # a tuned config outside this shape's tuning space falls back to the default
    assert resolve_config(kernels, gla, "triton", shape, "bwd") == kernels.default_config(shape)


def test_configured_passes_configs_through(gla):
    kernels = FakeKernels(gla)
    from sla_dsl.testing import make_inputs

    inputs = make_inputs(gla.recurrence, 1, 8, 2, 4, 4, initial_state=False)
    args = [inputs.get(n) for n in ("q", "k", "v", "g", "beta", "gq", "gk")] + [None, None, 0.5, False]
    Configured(kernels, fwd={"block": 32, "num_warps": 2, "wrong": False}).forward(*args)
    assert kernels.calls[-1] == ("fwd", {"block": 32, "num_warps": 2, "wrong": False})


def test_autotune_command_end_to_end_on_cpu(tables, monkeypatch, capsys):
    """`python -m sla_dsl autotune --device cpu` with the fake kernels standing in for the triton backend:
    sweeps, verifies, writes the table, prints the summary; a backend without the protocol is reported."""
    import sla_dsl.backends
    from sla_dsl.autotune import runner
    from sla_dsl.cli import main

    def fake_build(name, spec):
        return FakeKernels(spec) if name == "triton" else ReferenceKernels(spec)

    monkeypatch.setattr(sla_dsl.backends, "build_backend", fake_build)
    monkeypatch.setattr(runner, "source_hash", lambda spec, backend: HASH)
    code = main(["autotune", "--device", "cpu", "--backend", "all", "--spec", "gla", "--shapes", "1x32x2x8:fp32",
                 "--budget-seconds", "60", "--out-dir", str(tables), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tried 10, skipped 4 (compile/resources), failed 0," in out  # real CPU timings pick the winner
    assert "gla/tilelang: kernels have no tuning_space/default_config" in out
    data = table.read_table(table.table_path("cpu", "triton", "gla", tables))
    (key, stored), = data["entries"].items()
    assert key == "B1_T32_H2_K8_V8_float32" and set(stored) == {"shape", "fwd", "bwd"}
    assert stored["fwd"]["config"]["wrong"] is False and stored["fwd"]["skipped"] == 2
