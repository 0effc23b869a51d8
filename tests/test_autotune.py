"""CPU tests of the tuned tables, their lookup and the sweep driver (fake kernels, fake timings)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from sla_dsl.autotune import isolate, table
from sla_dsl.autotune.isolate import IsolatedDevice
from sla_dsl.autotune.precompile import Precompiler
from sla_dsl.autotune.protocol import ConfigRejected, config_label, override_config, resolve_config
from sla_dsl.autotune.runner import Configured, DeviceWork, call_arguments, verify_arguments, verify_config
from sla_dsl.autotune.shapes import Shape, bucket, nearest, parse_shape, parse_shapes, reference_shapes
from sla_dsl.autotune.space import Space, config_key
from sla_dsl.autotune.sweep import ConfigCrashed, RemoteError, Task, is_fatal, is_skippable, sweep
from sla_dsl.backends.reference import ReferenceKernels
from sla_dsl.codegen import SEED_SPECS_DIR, seed_specs
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


SHIPPED_TABLES = sorted(table.REPO_ROOT.joinpath("autotune").glob("*/*/*.json"))


@pytest.mark.parametrize("path", SHIPPED_TABLES, ids=[str(p.relative_to(table.REPO_ROOT)) for p in SHIPPED_TABLES])
def test_every_shipped_table_was_tuned_for_the_kernels_generated_now(path):
    """A template change stales the tables tuned for the old kernels: call-time lookups then ignore them (the
    phases whose code changed) with a warning. Re-sweep on that GPU, or delete the table, in the same change. An
    edit of the generated files' documentation alone leaves them valid (table.code_only)."""
    data = table.read_table(path)
    assert data is not None, f"{path}: unreadable"
    spec = {s.name: s for s in seed_specs()}[data["spec"]]
    assert (path.parent.name, path.stem) == (data["backend"], spec.name)
    assert table.valid_phases(data, spec, data["backend"]) == table.PHASES, (
        f"{path} was tuned for other generated kernels: re-tune with `{table.tune_command(spec, data['backend'])}` "
        f"on that GPU, or delete it")


def test_stale_entries_are_superseded_when_the_source_changes_until_retuned(tables, gla):
    """Entries tuned for other kernels leave "entries" (what lookups read) for "superseded_entries" (seeds of
    the re-tuning only), and leave those too, bucket by bucket and phase by phase, as they are re-tuned."""
    mid, small = Shape(4, 8192, 16, 128, 128), Shape(8, 2048, 16, 64, 64)
    write(tables, gla, {**entry(mid, fwd={"a": 1}, bwd={"a": 3})}, source="old" * 20)
    path = write(tables, gla, entry(small, fwd={"a": 2}))
    data = table.read_table(path)
    assert list(data["entries"]) == [small.key]
    assert data["superseded_entries"][mid.key]["fwd"]["config"] == {"a": 1}
    assert table.lookup(gla, "triton", mid, gpu=GPU, root=tables) is None or \
        table.lookup(gla, "triton", mid, gpu=GPU, root=tables) != {"a": 1}
    write(tables, gla, entry(mid, fwd={"a": 4}))  # the forward re-tuned: only the backward stays superseded
    data = table.read_table(path)
    assert set(data["superseded_entries"][mid.key]) == {"shape", "bwd"}
    write(tables, gla, entry(mid, bwd={"a": 5}))
    assert "superseded_entries" not in table.read_table(path)


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


@pytest.mark.parametrize("backend, fwd_only, bwd_only, shared", [
    ("triton", "output_kernel", "bwd_dqk_kernel", "_dot"), ("tilelang", "output", "bwd_chunk", "state_dtype")])
def test_a_phase_hash_changes_only_with_what_that_phase_runs(backend, fwd_only, bwd_only, shared):
    from sla_dsl.codegen import generator

    gdn = load_spec(SEED_SPECS_DIR / "gdn.yaml")
    files = generator(backend).generate(gdn)
    kernels = generator(backend).phase_kernels(gdn)
    assert set(kernels) == set(table.PHASES) and fwd_only in kernels["fwd"] and bwd_only in kernels["bwd"]
    before = table.phase_digests(files, kernels)

    def edited(function):  # a statement added to the body of one top-level function
        return {name: re.sub(rf"^(def {function}\(.*?:\n)", r"\1    pass\n", text, count=1, flags=re.M | re.S)
                for name, text in files.items()}

    for function, changed in ((fwd_only, {"fwd"}), (bwd_only, {"bwd"}), (shared, {"fwd", "bwd"})):
        after = table.phase_digests(edited(function), kernels)
        assert edited(function) != files
        assert {phase for phase in table.PHASES if after[phase] != before[phase]} == changed, function


def test_a_stage_added_to_one_phase_leaves_the_other_phase_hash():
    """A generated TileLang file lists every phase's kernels in one PHASES assignment: a backward stage added to it
    (its kernel at the file's end, after blank lines) changes the backward's hash only, and the forward's stages
    reordered the forward's only."""
    from sla_dsl.backends.tilelang import generator

    gdn = load_spec(SEED_SPECS_DIR / "gdn.yaml")
    files, kernels = generator.generate(gdn), generator.phase_kernels(gdn)
    before = table.phase_digests(files, kernels)
    added = {**kernels, "bwd": (*kernels["bwd"], "bwd_extra")}
    with_stage = {name: text.replace(repr(kernels), repr(added)) + "\n\ndef bwd_extra():\n    pass\n"
                  for name, text in files.items()}
    assert with_stage != files
    after = table.phase_digests(with_stage, added)
    assert after["fwd"] == before["fwd"] and after["bwd"] != before["bwd"]
    reordered = {"fwd": tuple(reversed(kernels["fwd"])), "bwd": kernels["bwd"]}
    relisted = {name: text.replace(repr(kernels), repr(reordered)) for name, text in files.items()}
    after = table.phase_digests(relisted, reordered)
    assert after["fwd"] != before["fwd"] and after["bwd"] == before["bwd"]


def test_code_only_is_the_source_text_without_its_documentation():
    """A table's phase hash must come out the same under every Python version that writes or reads it, so the code
    it digests is text: a dump of the syntax tree changes form between versions (3.12's differs from 3.11's)."""
    text = ('r"""Module doc."""\nimport x  # why\n\n\ndef f(a):\n    """Doc\n    more."""\n    # a note\n'
            '    return a + "#not a comment"  \n')
    assert table.code_only(text) == 'import x\ndef f(a):\n    return a + "#not a comment"'


@pytest.mark.parametrize("backend", ["triton", "tilelang"])
def test_documentation_edits_leave_the_phase_hashes(backend):
    """Comments, docstrings and layout of a generated file say nothing about what it computes: editing them keeps
    both phases' tuning; an edit of the code does not."""
    from sla_dsl.codegen import generator

    gdn = load_spec(SEED_SPECS_DIR / "gdn.yaml")
    files = generator(backend).generate(gdn)
    kernels = generator(backend).phase_kernels(gdn)
    before = table.phase_digests(files, kernels)
    documented = {name: re.sub(r'^(def \w+\(.*?:\n    """)', r"\1Edited. ", text, flags=re.M | re.S)
                  .replace("\n# ", "\n# edited: ") + "\n# a trailing comment\n" for name, text in files.items()}
    assert documented != files
    assert table.phase_digests(documented, kernels) == before
    computed = {name: text.replace("1e-06", "1e-05") for name, text in files.items()}
    assert computed != files
    assert all(table.phase_digests(computed, kernels)[phase] != before[phase] for phase in table.PHASES)


def test_a_table_stale_for_one_phase_keeps_the_other(tables, gla, monkeypatch):
    """A template change to backward kernels only: lookups keep the forward's configs, ignore the backward's
    (one warning naming it), and a re-tune supersedes the backward's entries only."""
    monkeypatch.setattr(table, "phase_source_hashes", lambda spec, backend: {"fwd": "a" * 64, "bwd": "b" * 64})
    mid, long = Shape(4, 8192, 16, 128, 128), Shape(1, 32768, 16, 128, 128)
    path = table.table_path(GPU, "triton", gla.name, tables)
    table.update_table(path, spec_name=gla.name, spec_sha256=gla.source_sha256, backend="triton", gpu=GPU,
                       source_sha256="f" * 64, phase_source_sha256={"fwd": "a" * 64, "bwd": "c" * 64},
                       entries=entry(mid, fwd={"num_warps": 4}, bwd={"num_warps": 8}))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert table.lookup(gla, "triton", mid, gpu=GPU) == {"num_warps": 4}
        assert table.lookup(gla, "triton", mid, phase="bwd", gpu=GPU) is None
    found = autotune_warnings(record)
    assert len(found) == 1 and "ignoring the bwd configs" in str(found[0].message)
    assert "fwd only" in table.describe(gla, "triton", gpu=GPU, root=tables)
    table.update_table(path, spec_name=gla.name, spec_sha256=gla.source_sha256, backend="triton", gpu=GPU,
                       source_sha256=HASH, phase_source_sha256={"fwd": "a" * 64, "bwd": "b" * 64},
                       entries=entry(long, bwd={"num_warps": 2}))
    data = table.read_table(path)
    assert data["entries"][mid.key]["fwd"]["config"] == {"num_warps": 4} and "bwd" not in data["entries"][mid.key]
    assert data["superseded_entries"][mid.key]["bwd"]["config"] == {"num_warps": 8}
    assert data["phase_source_sha256"] == {"fwd": "a" * 64, "bwd": "b" * 64}


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


# --- spaces ------------------------------------------------------------------------------------------------

def test_space_is_the_product_of_its_factors_and_moves_one_key_at_a_time():
    space = Space([{"BT": 16, "BC": 16}, {"BT": 32, "BC": 16}, {"BT": 32, "BC": 32}],
                  [{"BV": bv, "warps": w} for bv in (16, 32) for w in (4, 8)], order=("BV",))
    assert len(space) == 12 and len(list(space)) == 12 and space.keys == ("BV", "BT", "BC", "warps")
    config = {"BT": 32, "BC": 16, "BV": 16, "warps": 4}
    assert config in space
    assert {**config, "BT": 16, "BC": 32} not in space  # BC > BT: not a setting of its factor
    assert {**config, "warps": 4.0} not in space and {**config, "extra": 1} not in space
    assert {k: v for k, v in config.items() if k != "BC"} not in space
    # BV first (the order), then the other keys in factor order; BT=16 with BC=16 is a setting of the first factor
    assert space.moves(config) == [{**config, "BV": 32}, {**config, "BT": 16}, {**config, "BC": 32},
                                   {**config, "warps": 8}]
    assert Space.of([{"a": 1}, {"a": 2}]).moves({"a": 1}) == [{"a": 2}]
    # a linked key's moves also change one of its linked keys: warps with BV, after warps alone
    linked = Space(space.factors[0], space.factors[1], order=("BV",), linked={"warps": ("BV",)})
    assert linked.moves(config) == [*space.moves(config), {**config, "warps": 8, "BV": 32}]
    with pytest.raises(ValueError, match="not keys of one factor"):
        Space(space.factors[0], space.factors[1], linked={"warps": ("BT",)})
    with pytest.raises(ValueError, match="more than one factor"):
        Space([{"a": 1}], [{"a": 2, "b": 1}])
    with pytest.raises(ValueError, match="do not all have the keys"):
        Space([{"a": 1}, {"b": 1}])


def test_a_schedule_switch_leaves_out_the_moves_of_the_stages_it_does_not_run():
    """While "schedule" is "fused", the split stages' keys change nothing that runs: no move of theirs (it would
    time the same kernels again), and the other way round; the switch itself moves either way."""
    space = Space([{"chunk": c} for c in (32, 64)], [{"schedule": "split"}, {"schedule": "fused"}],
                  [{"states_bv": b} for b in (16, 32)], [{"fused_bv": b} for b in (32, 64)],
                  inactive={"schedule": {"split": ("fused_bv",), "fused": ("states_bv",)}})
    split = {"chunk": 64, "schedule": "split", "states_bv": 16, "fused_bv": 64}
    fused = {**split, "schedule": "fused"}
    assert space.ignored(split) == {"fused_bv"} and space.ignored(fused) == {"states_bv"}
    assert space.moves(split) == [{**split, "chunk": 32}, fused, {**split, "states_bv": 32}]
    assert space.moves(fused) == [{**fused, "chunk": 32}, split, {**fused, "fused_bv": 32}]
    assert space.first("schedule") == "split"
    with pytest.raises(ValueError, match=r"inactive keys \['gone'\] of 'schedule' are not keys of the space"):
        Space(*space.factors, inactive={"schedule": {"split": ("gone",)}})
    with pytest.raises(ValueError, match="inactive keys of 'nope', which is not a key"):
        Space(*space.factors, inactive={"nope": {"split": ("chunk",)}})


def test_the_combined_move_leaves_out_the_keys_a_switched_schedule_ignores():
    """A round where the fused schedule and a split stage's block both improved: combining them would time the
    fused move again (the split key is ignored there), so there is no combined move; with a third key that the
    fused schedule runs, the combination keeps that one and the switch."""
    from sla_dsl.autotune.sweep import _combined

    space = Space([{"schedule": "split"}, {"schedule": "fused"}], [{"states_bv": b} for b in (16, 32)],
                  [{"fused_bv": b} for b in (32, 64)], [{"chunk": c} for c in (32, 64)],
                  inactive={"schedule": {"split": ("fused_bv",), "fused": ("states_bv",)}})
    current = {"schedule": "split", "states_bv": 16, "fused_bv": 64, "chunk": 64}
    moved = [(1.0, {**current, "schedule": "fused"}), (2.0, {**current, "states_bv": 32})]
    assert _combined(current, 3.0, moved, space) is None
    moved.append((2.5, {**current, "chunk": 32}))
    assert _combined(current, 3.0, moved, space) == {**current, "schedule": "fused", "chunk": 32}


def test_a_seed_from_before_a_schedule_switch_keeps_the_schedule_it_ran(gla):
    """A table entry tuned before the fused schedule existed ran the split one: as a seed it takes the switch's
    first setting (split), not the default's (fused), which would leave its tuned settings inactive."""
    from sla_dsl.autotune.sweep import seeds_of

    space = Space([{"schedule": "split"}, {"schedule": "fused"}], [{"states_bv": b} for b in (16, 32)],
                  [{"fused_bv": b} for b in (32, 64)],
                  inactive={"schedule": {"split": ("fused_bv",), "fused": ("states_bv",)}})
    default = {"schedule": "fused", "states_bv": 16, "fused_bv": 64}
    task = Task(FakeKernels(gla), gla, "tilelang", Shape(1, 32, 2, 8, 8, "float32"), "fwd",
                seeds=({"states_bv": 32},))
    assert seeds_of(task, default, space) == [{"schedule": "split", "states_bv": 32, "fused_bv": 64}]


# --- the protocol and the sweep ------------------------------------------------------------------------------

class FakeKernels(ReferenceKernels):
    """The reference backend with the tuning protocol: block 256 fails to compile, 'wrong' scales the outputs
    (fast but wrong, like 16-bit operands that miss the tolerance)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.calls = []

    def tuning_space(self, shape, phase="fwd"):
        return Space([{"block": b} for b in (32, 64, 256)], [{"num_warps": w} for w in (2, 4, 8)],
                     [{"wrong": False}, {"wrong": True}])

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


# fake times add up per key, like the stages of a phase: block 64 and 2 warps are faster, 'wrong' too
BLOCK_MS, WARPS_MS, WRONG_MS = {32: 2.0, 64: 1.0}, {2: 1.5, 4: 2.0, 8: 1.8}, {False: 0.0, True: -0.5}


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
    ms = BLOCK_MS[config["block"]] + WARPS_MS[config["num_warps"]] + WRONG_MS[config["wrong"]]
    return ms * (0.9 if precise else 1.0)


def test_sweep_searches_by_moves_skips_compile_errors_never_builds_on_wrong_configs(tables, gla):
    """From the default (32, 4, ok: 4.0 ms) round 1 times every one-key move and their combination
    (64, 2, wrong: 2.0 ms), which fails the reference check, so round 2 starts from the fastest passing move
    (64, 4, ok: 3.0 ms) and finds (64, 2, ok: 2.5 ms); round 3 finds nothing faster."""
    kernels = FakeKernels(gla)
    shape = Shape(2, 64, 2, 8, 8, "float32")
    tasks = [Task(kernels, gla, "triton", shape, phase) for phase in ("fwd", "bwd")]
    written = []

    def on_result(result):
        written.append(result)
        write(tables, gla, {shape.bucket().key: {"shape": shape.as_dict(),
                                                 result.task.phase: result.entry()}})

    report = sweep(tasks, measure=fake_measure, verify=lambda t, c: verify_config(t, c, device="cpu"),
                   budget_seconds=120, on_result=on_result)
    assert report.aborted is None and len(written) == 2
    for result in report.results:
        assert result.space == 18 and result.rounds == 3 and result.unexplored == 0
        assert result.tried == 9 and result.skipped == 2 and result.failed == 0
        assert result.rejected == 1  # the fast-but-wrong combination; never timed around
        assert result.config == {"block": 64, "num_warps": 2, "wrong": False}
        assert result.ms == pytest.approx(2.25) and result.default_ms == pytest.approx(3.6)
        assert result.verified["o"] < 1e-5
    assert set(report.results[1].verified) >= {"o", "dq", "dk", "dv", "dg"}
    assert "skipped 4 (compile/resources)" in report.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert table.lookup(gla, "triton", shape, phase="bwd", gpu=GPU) == {"block": 64, "num_warps": 2,
                                                                             "wrong": False}


def test_sweep_budget_always_times_the_default_and_counts_the_moves_left_unexplored(gla):
    kernels = FakeKernels(gla)
    ticks = iter(range(0, 10_000, 100))
    report = sweep([Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")],
                   measure=fake_measure, verify=lambda t, c: (True, {}), budget_seconds=1,
                   clock=lambda: next(ticks))
    result = report.results[0]
    assert result.tried == 1 and result.unexplored == 5 and result.config == kernels.default_config(None)


def test_seeds_are_timed_after_the_default_and_the_search_starts_from_the_fastest(gla):
    """A warm start: the table's winner of another bucket is timed right after the default, so that even a budget
    that stops there writes it; configs outside the space and repeats of the default are left out."""
    kernels = FakeKernels(gla)
    neighbour = {"block": 64, "num_warps": 2, "wrong": False}
    seeds = (kernels.default_config(None), {"block": 128, "num_warps": 2, "wrong": False}, neighbour, neighbour)
    task = Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd", seeds=seeds)
    ticks = iter(range(0, 10_000, 100))
    report = sweep([task], measure=fake_measure, verify=lambda t, c: verify_config(t, c, device="cpu"),
                   budget_seconds=2, clock=lambda: next(ticks))
    result = report.results[0]
    assert result.tried == 2 and result.config == neighbour and result.ms < result.default_ms
    # with time to search, the moves start from the seed: its one-key moves, not the default's
    kernels.calls.clear()
    report = sweep([task], measure=fake_measure, verify=lambda t, c: verify_config(t, c, device="cpu"),
                   budget_seconds=120)
    timed = [c for phase, c in kernels.calls if c is not None]
    assert timed[:2] == [kernels.default_config(None), neighbour]
    assert {"block": 64, "num_warps": 8, "wrong": False} in timed  # a move of the seed
    assert {"block": 32, "num_warps": 8, "wrong": False} not in timed  # a move of the default only
    assert report.results[0].config == neighbour


def test_a_seed_without_a_key_the_space_gained_starts_from_the_defaults_setting_of_it(gla):
    """A table tuned before its template gained a parameter still seeds the re-sweep: the new key takes the
    default's setting; a seed with a key the space does not have stays out."""
    from sla_dsl.autotune.sweep import seeds_of

    kernels = FakeKernels(gla)
    task = Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd",
                seeds=({"block": 64, "num_warps": 2}, {"block": 64, "num_warps": 8, "gone": 1}))
    default = kernels.default_config(None)
    assert seeds_of(task, default, kernels.tuning_space(None)) == [{"block": 64, "num_warps": 2, "wrong": False}]


@pytest.mark.parametrize("phase, listed", [("bwd", ["bwd"]), ("fwd", ["fwd"]), ("all", ["fwd", "bwd"])])
def test_phase_option_tunes_only_that_phase(phase, listed, capsys):
    from sla_dsl.cli import main

    assert main(["autotune", "--spec", "gla", "--backend", "tilelang", "--shapes", "1x64x2x16", "--phase", phase,
                 "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].split()[-1] for line in lines] == listed


def test_moves_of_linked_keys_are_timed_and_left_out_of_the_combined_move():
    """A round's improving one-key moves combine into one config; a linked move (two keys) is timed like any
    move but never combined (session 16's first bwd sweep crashed there)."""
    from sla_dsl.autotune.sweep import _combined

    space = Space([{"bv": b, "mb": m} for b in (32, 64) for m in (1, 2)], [{"w": w} for w in (4, 8)],
                  linked={"mb": ("bv",)})
    current = {"bv": 64, "mb": 1, "w": 4}
    moved = [(ms, config) for ms, config in zip((3.0, 5.0, 2.0, 1.0), space.moves(current))]
    assert [c for _, c in moved] == [{"bv": 32, "mb": 1, "w": 4}, {"bv": 64, "mb": 2, "w": 4},
                                     {"bv": 32, "mb": 2, "w": 4}, {"bv": 64, "mb": 1, "w": 8}]
    assert _combined(current, 4.0, moved, space) == {"bv": 32, "mb": 1, "w": 8}


def test_only_stale_leaves_out_what_the_table_holds_for_the_kernels_generated_now(tables, gla, monkeypatch,
                                                                                  capsys):
    from sla_dsl.cli import main

    monkeypatch.setenv("SLA_DSL_AUTOTUNE_GPU", GPU)
    shape = Shape(1, 64, 2, 16, 16, "bfloat16")
    argv = ["autotune", "--spec", "gla", "--backend", "tilelang", "--shapes", "1x64x2x16", "--only-stale", "--list"]

    def listed():
        assert main(argv) == 0
        return [line.split(":")[0].split()[-1] for line in capsys.readouterr().out.splitlines() if "configs" in line]

    assert listed() == ["fwd", "bwd"]  # no table yet
    write(tables, gla, entry(shape, fwd={"chunk": 64}), backend="tilelang")
    assert listed() == ["bwd"]
    write(tables, gla, entry(shape, bwd={"chunk": 64}), backend="tilelang")
    assert listed() == []
    write(tables, gla, entry(shape, fwd={"chunk": 64}), source="f" * 64, backend="tilelang")  # other kernels
    assert listed() == ["fwd", "bwd"]
    monkeypatch.delenv("SLA_DSL_AUTOTUNE_GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 2 and "SLA_DSL_AUTOTUNE_GPU" in capsys.readouterr().out


def test_table_seeds_are_the_buckets_winners_own_bucket_first_then_nearest(tables, gla, monkeypatch):
    from sla_dsl.autotune import runner
    from sla_dsl.autotune.runner import table_seeds

    monkeypatch.setattr(runner, "source_hash", table.source_hash)

    here, near, far, other = (Shape(1, 32768, 16, 128, 128), Shape(4, 8192, 16, 128, 128),
                              Shape(4, 512, 16, 128, 128), Shape(8, 2048, 16, 64, 64))
    for shape, warps in ((far, 4), (near, 2), (other, 8)):
        write(tables, gla, entry(shape, fwd={"num_warps": warps}))
    write(tables, gla, entry(near, bwd={"num_warps": 16}))
    task = Task(None, gla, "triton", here, "fwd")
    assert table_seeds(task, tables, GPU) == ({"num_warps": 2}, {"num_warps": 4}, {"num_warps": 8})
    assert table_seeds(dataclasses.replace(task, phase="bwd"), tables, GPU) == ({"num_warps": 16},)
    write(tables, gla, entry(here, fwd={"num_warps": 1}))  # a re-run of a tuned bucket starts from its winner
    assert table_seeds(task, tables, GPU) == ({"num_warps": 1}, {"num_warps": 2}, {"num_warps": 4},
                                              {"num_warps": 8})
    assert table_seeds(task, tables, "Other_GPU") == ()


def test_other_specs_winners_of_the_bucket_seed_after_the_specs_own(tables, gla, monkeypatch):
    """Another spec's winner for the task's bucket is a seed (the sweep keeps it where it is a member of the
    task's space: same stages); its other buckets are not."""
    from sla_dsl.autotune import runner
    from sla_dsl.autotune.runner import table_seeds

    monkeypatch.setattr(runner, "source_hash", table.source_hash)
    sibling = dataclasses.replace(gla, name="sla_" + gla.name)
    here, near = Shape(4, 8192, 16, 128, 128), Shape(1, 32768, 16, 128, 128)
    write(tables, sibling, {**entry(here, fwd={"num_warps": 8})})
    write(tables, sibling, entry(near, fwd={"num_warps": 16}))
    task = Task(None, gla, "triton", here, "fwd")
    assert table_seeds(task, tables, GPU) == ({"num_warps": 8},)  # a spec never tuned here
    write(tables, gla, entry(near, fwd={"num_warps": 2}))
    write(tables, gla, entry(here, fwd={"num_warps": 8}))
    assert table_seeds(task, tables, GPU) == ({"num_warps": 8}, {"num_warps": 2})  # once each, its own first
    (tables / GPU / "triton" / f"{sibling.name}.json").write_text("{ truncated")
    assert table_seeds(task, tables, GPU) == ({"num_warps": 8}, {"num_warps": 2})


def test_a_table_for_other_kernels_still_seeds_the_retuning(tables, gla, monkeypatch):
    """After a template change the table is stale (ignored at call time), but its winners are where the
    re-tuning starts; update_table then replaces the stale table bucket by bucket."""
    from sla_dsl.autotune import runner
    from sla_dsl.autotune.runner import table_seeds

    monkeypatch.setattr(runner, "source_hash", table.source_hash)
    here, near = Shape(4, 8192, 16, 128, 128), Shape(1, 32768, 16, 128, 128)
    write(tables, gla, entry(here, fwd={"num_warps": 2}), source="f" * 64)
    write(tables, gla, entry(near, fwd={"num_warps": 4}), source="f" * 64)
    assert table.read_table(table.table_path(GPU, "triton", gla.name, tables))["source_sha256"] != \
        table.source_hash(gla, "triton")
    task = Task(None, gla, "triton", here, "fwd")
    assert table_seeds(task, tables, GPU) == ({"num_warps": 2}, {"num_warps": 4})
    # a sweep cut short after re-tuning the other bucket: the superseded winner of this one still comes first
    write(tables, gla, entry(near, fwd={"num_warps": 8}))
    assert table_seeds(task, tables, GPU) == ({"num_warps": 2}, {"num_warps": 8})
    write(tables, gla, entry(here, bwd={"num_warps": 16}))  # another phase re-tuned: this one's still superseded
    assert table_seeds(task, tables, GPU) == ({"num_warps": 2}, {"num_warps": 8})
    write(tables, gla, entry(here, fwd={"num_warps": 1}))  # re-tuned, from that seed: its superseded one is gone
    assert table_seeds(task, tables, GPU) == ({"num_warps": 1}, {"num_warps": 8})
    (tables / GPU / "triton" / f"{gla.name}.json").write_text("{ truncated")
    assert table_seeds(task, tables, GPU) == ()


def test_sweep_shares_the_budget_in_proportion_to_each_tasks_first_round(gla, monkeypatch):
    from sla_dsl.autotune import sweep as sweep_module

    kernels = FakeKernels(gla)
    tasks = [Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), phase) for phase in ("fwd", "bwd")]
    first_rounds = {"fwd": [{}], "bwd": [{}, {}, {}]}  # a backward with three times the forward's moves
    deadlines = {}

    def fake_run_task(task, *, deadline, **_):
        deadlines[task.phase] = deadline
        return sweep_module.TaskResult(task, error="not run")

    monkeypatch.setattr(sweep_module, "first_round", lambda task: first_rounds[task.phase])
    monkeypatch.setattr(sweep_module, "run_task", fake_run_task)
    sweep(tasks, measure=fake_measure, verify=lambda t, c: (True, {}), budget_seconds=100, clock=lambda: 0.0)
    # four fifths of each share is for the search: 1/4 of the budget for fwd, then all that is left for bwd
    assert deadlines == {"fwd": pytest.approx(20.0), "bwd": pytest.approx(80.0)}


def test_budget_left_at_the_end_resumes_the_tasks_their_deadline_stopped(gla):
    """A task's share is fixed when it starts. The first task here (1 s per timing) is stopped by its deadline;
    the second has a larger first round, so a larger share, but converges in one quick round (0.1 s per timing),
    and the time it leaves goes back to the first, which goes on from its best config, never re-times a config,
    finds the space's fastest, and is written a second time."""
    now = [0.0]

    def measure(task, config, precise=False):
        if task.phase == "bwd":  # every move of the default is slower
            now[0] += 0.1
            return 1.0 if config == task.kernels.default_config(None) else 2.0
        now[0] += 1.0
        if not precise:  # the finalists' precise re-timings repeat configs by design
            timed.append(config_key(config))
        return fake_measure(task, config, precise)

    class ManyMoves(FakeKernels):
        def tuning_space(self, shape, phase="fwd"):
            return Space([{"block": 32}], [{"num_warps": w} for w in range(4, 34)], [{"wrong": False}])

    timed, written = [], []
    shape = Shape(1, 32, 2, 8, 8, "float32")
    tasks = [Task(FakeKernels(gla), gla, "triton", shape, "fwd"), Task(ManyMoves(gla), gla, "triton", shape, "bwd")]
    report = sweep(tasks, measure=measure, verify=lambda t, c: (not c["wrong"], {}), budget_seconds=48,
                   clock=lambda: now[0], on_result=lambda r: written.append((r.task.phase, r.ms, r.unexplored)))
    first = report.results[0]
    assert [phase for phase, *_ in written] == ["fwd", "bwd", "fwd"]
    assert written[0][2] > 0 and first.unexplored == 0  # stopped, then resumed to the end of its search
    assert first.rounds > 1 and len(timed) == len(set(timed)) == first.tried + first.skipped  # none twice
    fastest = min([(b, w) for b in (32, 64) for w in (2, 4, 8)], key=lambda bw: BLOCK_MS[bw[0]] + WARPS_MS[bw[1]])
    assert first.config == {"block": fastest[0], "num_warps": fastest[1], "wrong": False}
    assert first.ms < written[0][1]
    assert report.results[1].unexplored == 0 and report.wall_s <= 48


def test_nothing_resumes_when_the_budget_is_spent(gla):
    now = [0.0]

    def measure(task, config, precise=False):
        now[0] += 1.0
        return fake_measure(task, config, precise)

    written = []
    report = sweep([Task(FakeKernels(gla), gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")],
                   measure=measure, verify=lambda t, c: (True, {}), budget_seconds=4, clock=lambda: now[0],
                   on_result=written.append)
    assert len(written) == 1 and report.results[0].unexplored > 0


def test_sweep_reports_when_no_config_passes(gla):
    kernels = FakeKernels(gla)
    report = sweep([Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")],
                   measure=fake_measure, verify=lambda t, c: (False, {"o": 1.0}), budget_seconds=30)
    assert report.results[0].config is None and "NOT WRITTEN" in report.summary()


def test_sweep_reports_a_default_outside_the_space(gla):
    kernels = FakeKernels(gla)
    kernels.default_config = lambda shape, phase="fwd": {"block": 128, "num_warps": 4, "wrong": False}
    report = sweep([Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")],
                   measure=fake_measure, verify=lambda t, c: (True, {}), budget_seconds=30)
    assert report.results[0].config is None and "is not in the tuning space" in report.results[0].error


class RecordingCompiler:
    """Stands in for the precompile pool: records what the sweep asks for, and in which order."""

    def __init__(self):
        self.events = []

    def request(self, task, configs, priority):
        self.events += [("request", task.phase, priority, config_label(c)) for c in configs]

    def wait(self, task, config, timeout):
        self.events.append(("wait", task.phase, config_label(config)))
        return True

    def paused(self):
        return contextlib.nullcontext()


@pytest.mark.parametrize("compile_wait_s, expected_tried", [(8.0, 9), (30.0, 2)])
def test_waiting_for_compiles_moves_a_tasks_deadline_by_at_most_its_share(gla, compile_wait_s, expected_tried):
    from sla_dsl.autotune.sweep import run_task

    now = [0.0]

    class SlowPool(RecordingCompiler):
        def wait(self, task, config, timeout):
            super().wait(task, config, timeout)
            if sum(e[0] == "wait" for e in self.events) == 2:  # the first move, still compiling after the default
                now[0] += compile_wait_s
            return True

    def one_second_each(task, config, precise=False):
        now[0] += 1.0
        return fake_measure(task, config, precise)

    task = Task(FakeKernels(gla), gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")
    result = run_task(task, measure=one_second_each, verify=lambda t, c: (True, {}), deadline=10.0,
                      clock=lambda: now[0], compiler=SlowPool())
    # 8 s of waiting leave the 10 s of timing whole: 9 configs of 1 s (without the extension the deadline would
    # stop it at 3); 30 s of waiting extend it by the 10 s share only, gone by then: the default and the move
    assert result.tried == expected_tried


def test_sweep_queues_every_first_round_up_front_and_waits_before_each_timing(gla):
    kernels = FakeKernels(gla)
    compiler = RecordingCompiler()
    tasks = [Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), phase) for phase in ("fwd", "bwd")]
    report = sweep(tasks, measure=fake_measure, verify=lambda t, c: (True, {}), budget_seconds=60, compiler=compiler)
    first = [e for e in compiler.events[:12]]
    default = config_label(kernels.default_config(None))
    assert first[0] == ("request", "fwd", 0, default) and first[6] == ("request", "bwd", 1, default)
    assert all(e[0] == "request" for e in first) and compiler.events[12] == ("wait", "fwd", default)
    timed = [e for e in compiler.events if e[0] == "wait"]
    # every timing (and skipped compile) of both tasks waited for its compile: per task the default, two rounds
    # of 5 one-key moves and the combination of round one's improvements
    attempts = [r.tried + r.skipped + r.failed for r in report.results]
    assert attempts == [12, 12] and len(timed) == sum(attempts)
    assert len({e[1:] for e in timed}) == len(timed)  # no config timed twice


def test_the_precise_timings_run_with_the_compile_workers_paused(gla):
    """Only the finalists' precise timings: the quick ones share the host with the compiles they wait for."""
    class PausingCompiler(RecordingCompiler):
        paused_now = False

        @contextlib.contextmanager
        def paused(self):
            self.paused_now = True
            self.events.append(("pause",))
            yield
            self.paused_now = False
            self.events.append(("resume",))

    compiler = PausingCompiler()
    timings = []

    def measure(task, config, precise=False):
        timings.append((precise, compiler.paused_now))
        return fake_measure(task, config, precise)

    task = Task(FakeKernels(gla), gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")
    sweep([task], measure=measure, verify=lambda t, c: (True, {}), budget_seconds=60, compiler=compiler)
    assert {precise for precise, _ in timings} == {False, True}
    assert all(precise == paused for precise, paused in timings)
    assert [e for e in compiler.events if e[0] in ("pause", "resume")] == [("pause",), ("resume",)]


def test_error_classification():
    assert is_skippable(ConfigRejected("too big"))
    assert is_skippable(RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory"))
    assert not is_skippable(ValueError("shape mismatch"))
    assert is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    # an error from the worker process keeps the classification it got there
    assert is_skippable(RemoteError("CompilationError", "at 12:4: bad", True))
    assert not is_skippable(RemoteError("ValueError", "compiled fine, wrong shape", False))


def test_sweep_counts_configs_that_crash_their_precise_timing_or_reference_check(gla):
    """ConfigCrashed from measure or verify (what IsolatedDevice raises once it replaced its worker) is counted
    as crashed, listed in the summary, and that config is never written."""
    kernels = FakeKernels(gla)
    fastest = {"block": 64, "num_warps": 2, "wrong": False}

    def measure(task, config, precise=False):
        if precise and config == {"block": 64, "num_warps": 4, "wrong": False}:
            raise ConfigCrashed("crashed the worker process (killed by SIGSEGV)")
        return fake_measure(task, config, precise)

    def verify(task, config):
        if config == fastest:
            raise ConfigCrashed("crashed the CUDA context: AcceleratorError: CUDA error: an illegal memory access")
        return not config["wrong"], {}

    report = sweep([Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")], measure=measure,
                   verify=verify, budget_seconds=60)
    result = report.results[0]
    # (64, 2, ok) never becomes a base, so the search goes on from (64, 4, ok) and ends at (64, 8, ok), which
    # wins once (64, 4, ok) crashed its precise timing
    assert result.crashed == 2 and result.entry()["crashed"] == 2 and result.failed == 0
    assert result.config == {"block": 64, "num_warps": 8, "wrong": False}
    summary = report.summary()
    assert "crashed 2 (killed the worker process" in summary and "0 failed, 2 crashed)" in summary
    assert "crashed: [block=64 num_warps=2 wrong=False] reference check: crashed the CUDA context" in summary
    assert "crashed: [block=64 num_warps=4 wrong=False] precise timing: crashed the worker process" in summary


# --- the worker process the sweep outlives (isolate) --------------------------------------------------------

class CrashingWork(DeviceWork):
    """Worker work for FakeKernels on CPU: fake_measure's times and the real reference check, each request
    logged as '<pid> <kind> <config>' to `log`; the configs labelled in `crashes` crash the worker: 'cuda'
    raises what an illegal memory access raises, 'exit' ends the process, 'hang' never answers."""

    def __init__(self, log, crashes):
        super().__init__("cpu")
        self.log, self.crashes = str(log), crashes

    def build(self, backend, spec):
        return FakeKernels(spec)

    def _request(self, kind, config):
        with open(self.log, "a") as handle:
            handle.write(f"{os.getpid()} {kind} {config_label(config)}\n")
        crash = self.crashes.get(config_label(config))
        if crash == "cuda":
            raise type("AcceleratorError", (RuntimeError,), {})("CUDA error: an illegal memory access was "
                                                                "encountered")
        if crash == "exit":
            os._exit(1)
        if crash == "hang":
            time.sleep(600)

    def measure(self, task, config, precise):
        self._request("measure", config)
        return fake_measure(task, config, precise)

    def verify(self, task, config):
        self._request("verify", config)
        return super().verify(task, config)


def test_a_config_that_crashes_its_worker_is_counted_and_the_sweep_goes_on_in_a_fresh_one(tables, gla, tmp_path):
    """Round 1 from the default (32, 4, ok) meets a CUDA error that kills the context, then a worker that
    exits; round 2 meets a hang. Each is counted as crashed, the next config runs in a new worker process,
    and the search still finds (64, 2, ok) and writes it."""
    label = lambda **kw: config_label({"block": 32, "num_warps": 4, "wrong": False, **kw})  # noqa: E731
    crashes = {label(num_warps=8): "cuda", label(wrong=True): "exit", label(block=64, num_warps=8): "hang"}
    log = tmp_path / "requests.log"
    device = IsolatedDevice(CrashingWork(log, crashes), timeout_s=4)
    shape = Shape(2, 64, 2, 8, 8, "float32")
    kernels = FakeKernels(gla)  # the sweep's own copy: tuning space and default only, never run here

    def on_result(result):
        write(tables, gla, {shape.bucket().key: {"shape": shape.as_dict(), result.task.phase: result.entry()}})

    try:
        report = sweep([Task(kernels, gla, "triton", shape, "fwd")], measure=device.measure, verify=device.verify,
                       budget_seconds=120, on_result=on_result)
    finally:
        device.close()
    assert kernels.calls == []
    result = report.results[0]
    assert report.aborted is None and result.config == {"block": 64, "num_warps": 2, "wrong": False}
    assert result.crashed == 3 and result.failed == 0 and result.skipped == 2 and result.tried == 5
    assert device.started == 4 and device.crashes == 3
    summary = report.summary()
    assert "crashed 3 (killed the worker process, which was replaced)" in summary
    assert f"crashed: [{label(num_warps=8)}] timing: crashed the CUDA context: AcceleratorError: CUDA error: an " \
           "illegal memory access was encountered" in summary
    assert f"crashed: [{label(wrong=True)}] timing: crashed the worker process (exit code 1)" in summary
    assert f"crashed: [{label(block=64, num_warps=8)}] timing: hung: no answer within 4 s" in summary
    # every crash ended its worker: the next request came from another process
    lines = [line.split(" ", 2) for line in log.read_text().splitlines()]
    assert len({pid for pid, _, _ in lines}) == 4
    for number, (pid, _, config) in enumerate(lines[:-1]):
        assert (lines[number + 1][0] != pid) == (config in crashes)
    assert any(kind == "verify" for _, kind, _ in lines)  # the reference check ran in the worker too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert table.lookup(gla, "triton", shape, gpu=GPU) == {"block": 64, "num_warps": 2, "wrong": False}
    data = table.read_table(table.table_path(GPU, "triton", "gla", tables))
    assert data["entries"][shape.bucket().key]["fwd"]["crashed"] == 3


class NeverStarts:
    """Work whose unpickling ends the worker process before it is ready."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_worker_that_cannot_start_stops_the_sweep_with_the_reason(gla, monkeypatch):
    kernels = FakeKernels(gla)
    tasks = [Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), phase) for phase in ("fwd", "bwd")]
    device = IsolatedDevice(NeverStarts())
    try:
        report = sweep(tasks, measure=device.measure, verify=device.verify, budget_seconds=60)
    finally:
        device.close()
    assert len(report.results) == 1 and report.results[0].config is None
    assert report.aborted == "the worker process exited before it was ready (exit code 3; its error, if any, is " \
                             "printed above) (1 later task(s) not run)"
    assert "ABORTED: the worker process exited before it was ready" in report.summary()


def test_a_device_that_crashes_every_request_stops_the_sweep(gla, tmp_path, monkeypatch):
    """Crash after crash (the GPU itself is gone): after MAX_CRASHES_IN_A_ROW the sweep stops. (Forked workers:
    the test above spawns them.)"""
    monkeypatch.setattr(isolate, "MAX_CRASHES_IN_A_ROW", 2)
    kernels = FakeKernels(gla)
    default = config_label(kernels.default_config(None))
    device = IsolatedDevice(CrashingWork(tmp_path / "log", {default: "cuda", config_label(
        {"block": 64, "num_warps": 4, "wrong": False}): "exit"}), start_method="fork")
    try:
        report = sweep([Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")],
                       measure=device.measure, verify=device.verify, budget_seconds=60)
    finally:
        device.close()
    assert report.aborted.startswith("2 requests in a row crashed the worker process, the device looks unusable "
                                     "(the last one crashed the worker process (exit code 1))")


def _compile_or_die(backend, spec, shape, phase, config):
    """A compile job of a pool worker: block 256 kills its worker, the others take a moment."""
    if config["block"] == 256:
        os._exit(7)
    time.sleep(0.2)


def _precompile_every_valid_config(gla, workers: int, job) -> tuple[Precompiler, list]:
    """A Precompiler of `workers` forked workers running `job`, after it compiled the 9 valid configs of a fake
    task (3 of them with block 256); returns it (closed) and every pool it made."""
    kernels = FakeKernels(gla)
    task = Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")
    configs = [c for c in Space.of(kernels.tuning_space(task.shape)) if not c["wrong"]]
    assert len(configs) == 9 and sum(c["block"] == 256 for c in configs) == 3
    pools = []

    def make_pool(count):
        pools.append(ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork")))
        return pools[-1]

    compiler = Precompiler(workers, make_pool=make_pool, job=job)
    try:
        compiler.request(task, configs, 0)
        assert all(compiler.wait(task, config, 60) for config in configs)
    finally:
        compiler.close()
    return compiler, pools


def test_a_dead_compile_worker_loses_only_its_config_and_the_pool_is_replaced(gla):
    compiler, pools = _precompile_every_valid_config(gla, 3, _compile_or_die)
    assert compiler.failed == 3 and compiler.compiled == 6 and 1 <= compiler.pool_deaths == len(pools) - 1
    assert compiler.errors == ["BrokenProcessPool: its compile worker died (exit code 7)"] * 3
    assert "a compile worker died" in compiler.summary()


class _UnpicklableCompileError(Exception):
    """Like TileLang's compile errors (tvm ffi objects): raising it is fine, pickling it is not."""

    def __reduce__(self):
        raise TypeError("Type `ffi.Error` does not support ToJSONGraph")


def _compile_or_raise_unpicklable(backend, spec, shape, phase, config):
    if config["block"] == 256:
        raise _UnpicklableCompileError("Not a canonical GMMA_MN layout")


def test_a_compile_error_that_does_not_pickle_fails_its_config_and_keeps_the_pool(gla):
    """The H100 TileLang sweep of 2026-11-23 replaced its pool four times: each worker died sending back an
    error that does not pickle."""
    compiler, pools = _precompile_every_valid_config(gla, 2, _compile_or_raise_unpicklable)
    assert compiler.pool_deaths == 0 and len(pools) == 1
    assert compiler.failed == 3 and compiler.compiled == 6
    assert compiler.errors == ["_UnpicklableCompileError: Not a canonical GMMA_MN layout"] * 3


def _compile_slowly(*args):
    time.sleep(30)


def test_closing_the_precompiler_does_not_count_the_compiles_it_ends(gla):
    """The H100 sweep's summary counted every compile that close() ended as failed, "a compile worker died"."""
    kernels = FakeKernels(gla)
    task = Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")
    compiler = Precompiler(2, make_pool=lambda workers: ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork")), job=_compile_slowly)
    compiler.request(task, [kernels.default_config(None), {**kernels.default_config(None), "block": 64}], 0)
    time.sleep(0.5)
    compiler.close()
    deadline = time.monotonic() + 10
    while compiler._running and time.monotonic() < deadline:  # the ended jobs' callbacks
        time.sleep(0.05)
    assert compiler._running == 0
    assert compiler.failed == 0 and compiler.errors == [] and compiler.summary().endswith("0 failed there")


def _compile_in_a_child(backend, spec, shape, phase, config):
    """A compile job that runs a compiler process, as TileLang's nvcc: `sleep`, its pid in $SLA_DSL_TEST_PIDS."""
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    with open(os.path.join(os.environ["SLA_DSL_TEST_PIDS"], str(config["block"])), "w") as handle:
        handle.write(f"{os.getpid()} {child.pid}")
    child.wait()


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


def _states_become(pids, wanted, timeout: float = 5.0) -> bool:
    """Whether the processes' states satisfy `wanted` within `timeout` (signals are delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while not wanted([_process_state(pid) for pid in pids]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads process states from Linux /proc")
def test_paused_stops_the_compile_workers_and_their_compilers_until_it_ends(gla, tmp_path, monkeypatch):
    """The sweep's precise timings run with the compile workers and their child processes stopped."""
    monkeypatch.setenv("SLA_DSL_TEST_PIDS", str(tmp_path))
    kernels = FakeKernels(gla)
    task = Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), "fwd")
    compiler = Precompiler(2, make_pool=lambda workers: ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork")), job=_compile_in_a_child)
    try:
        compiler.request(task, [kernels.default_config(None), {**kernels.default_config(None), "block": 64}], 0)
        deadline = time.monotonic() + 20
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the pid files are written before the children's exec
        pids = [int(pid) for path in tmp_path.iterdir() for pid in path.read_text().split()]
        assert len(pids) == 4
        with compiler.paused():
            assert _states_become(pids, lambda states: states == ["T"] * 4)
        assert _states_become(pids, lambda states: "T" not in states)
    finally:
        compiler.close()


def test_resolve_config_prefers_given_then_valid_table_then_default(tables, gla, monkeypatch):
    kernels = FakeKernels(gla)
    shape = Shape(2, 64, 2, 8, 8, "float32")
    write(tables, gla, entry(shape, fwd={"block": 64, "num_warps": 2, "wrong": False},
                             bwd={"block": 999, "num_warps": 2, "wrong": False}))
    monkeypatch.setattr(table, "gpu_name", lambda device=None: GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_config(kernels, gla, "triton", shape, "fwd", {"x": 1}) == {"x": 1}
    assert resolve_config(kernels, gla, "triton", shape, "fwd") == {"block": 64, "num_warps": 2, "wrong": False}
    # a tuned config outside this shape's tuning space falls back to the default
    assert resolve_config(kernels, gla, "triton", shape, "bwd") == kernels.default_config(shape)


def test_a_call_with_a_config_evaluates_the_default_once_per_shape_and_phase(gla):
    """override_config completes a call's config from the default; a sweep passes a config to every timed call,
    so the default (the TileLang heuristic costs up to a millisecond) must be computed once, and a caller
    changing the dict it gets back must not change the next call's."""
    evaluated = []

    class CountingKernels(FakeKernels):
        def default_config(self, shape, phase="fwd"):
            evaluated.append((shape, phase))
            return super().default_config(shape, phase)

    kernels = CountingKernels(gla)
    shape, other = Shape(2, 64, 2, 8, 8, "float32"), Shape(2, 128, 2, 8, 8, "float32")
    for _ in range(5):
        config = override_config(kernels, gla, "triton", shape, "fwd", {"num_warps": 8})
        assert config == {"block": 32, "num_warps": 8, "wrong": False}
        config["block"] = 64
    assert sorted(evaluated, key=str) == sorted([(shape, "fwd"), (shape, "bwd")], key=str)
    override_config(kernels, gla, "triton", other, "bwd", {"num_warps": 2})
    assert len(evaluated) == 4
    with pytest.raises(ValueError, match="unknown keys \\['nope'\\]"):
        override_config(kernels, gla, "triton", shape, "fwd", {"nope": 1})


def test_forced_gpu_reads_that_gpus_tables_without_cuda(tables, gla, monkeypatch):
    shape = Shape(2, 64, 2, 8, 8, "float32")
    write(tables, gla, entry(shape, fwd={"block": 64, "num_warps": 2, "wrong": False}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert table.lookup(gla, "triton", shape) is None
    monkeypatch.setenv("SLA_DSL_AUTOTUNE_GPU", GPU)
    assert table.lookup(gla, "triton", shape) == {"block": 64, "num_warps": 2, "wrong": False}
    assert table.describe(gla, "triton", root=tables) == "tuned (1 buckets)"


def test_configured_passes_configs_through(gla):
    kernels = FakeKernels(gla)
    from sla_dsl.testing import make_inputs

    inputs = make_inputs(gla.recurrence, 1, 8, 2, 4, 4, initial_state=False)
    args = [inputs.get(n) for n in ("q", "k", "v", "g", "beta", "gq", "gk")] + [None, None, 0.5, False]
    Configured(kernels, fwd={"block": 32, "num_warps": 2, "wrong": False}).forward(*args)
    assert kernels.calls[-1] == ("fwd", {"block": 32, "num_warps": 2, "wrong": False})


def test_timing_compiling_and_checking_pass_the_same_kinds_of_arguments(gla):
    """The kernels the sweep times are the ones its workers compiled and its reference check runs: every
    argument has the same dtype (decays float32, the rest in the shape's dtype) and the same optional
    tensors are there (initial state, final state's gradient)."""
    for spec in seed_specs():
        for varlen in (False, True):
            shape = Shape(2, 40, 2, 16, 16, "bfloat16", varlen)
            positional, cu_seqlens, _, do, dfinal = call_arguments(spec, shape, "cpu")
            inputs, verify_cu_seqlens = verify_arguments(spec, shape, "cpu")
            timed = dict(zip(("q", "k", "v", "g", "beta", "gq", "gk", "initial_state"), positional))
            assert {n: t.dtype for n, t in timed.items() if t is not None} == {n: t.dtype for n, t in inputs.items()}
            assert (cu_seqlens is None) == (verify_cu_seqlens is None) == (not varlen)
            assert do.dtype == torch.bfloat16 and dfinal.dtype == torch.float32


def test_git_revision_says_when_the_files_differ_from_head(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "kernel.py").write_text("a\n")
    git("add", "kernel.py")
    git("commit", "-qm", "one")
    head = table.git_revision(tmp_path)
    assert head and not head.endswith("+dirty")
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert table.git_revision(tmp_path) == head
    (tmp_path / "kernel.py").write_text("b\n")
    assert table.git_revision(tmp_path) == head + "+dirty"


def test_tilelang_default_chunk_is_32_for_a_vector_decay_or_the_delta_rule():
    from sla_dsl.backends.tilelang import TileLangKernels

    shape = Shape(4, 8192, 16, 128, 128, "bfloat16")
    chunks = {spec.name: TileLangKernels(spec).default_config(shape, "fwd")["chunk"] for spec in seed_specs()}
    assert chunks == {"retnet": 64, "sla_retnet": 64, "gla": 32, "sla_gla": 32, "gdn": 32, "sla_gdn": 32}


def test_compiling_ahead_compiles_what_a_call_runs_with_the_backends_fixed_settings(gla, monkeypatch):
    """A backend built with fixed settings (its constructor's config, or $SLA_DSL_TILELANG_CONFIG) runs them in
    every call without a config: compiling ahead for such a call compiles them too (a gpu-check with the fused
    schedule forced compiled the split forward's kernels ahead, and the fused one at its first call)."""
    from sla_dsl.autotune import precompile

    class Compiling(FakeKernels):
        def forward(self, *args, config=None, compile_only=False):
            self.calls.append(("fwd", config, compile_only))

    kernels = Compiling(gla)
    kernels.config = {"num_warps": 8}
    monkeypatch.setitem(precompile._built, ("fake", gla.name, gla.source_sha256), kernels)
    precompile.compile_config("fake", gla, Shape(1, 32, 2, 8, 8, "float32"), "fwd", None)
    assert kernels.calls == [("fwd", {"block": 32, "num_warps": 8, "wrong": False}, True)]


def test_tilelang_default_forward_schedule_is_fused_where_its_grid_fills_the_gpu():
    """retnet's forward has two schedules: fused (states_output) where B * H * V / 64 CTAs reach
    FUSED_MIN_PROGRAMS, else split; each default is in the space and names both schedules' settings. gdn's forward
    (delta rule) and gla's (vector decay) have one schedule and no switch."""
    from sla_dsl.backends.tilelang import TileLangKernels, tuning

    by_name = {spec.name: TileLangKernels(spec) for spec in seed_specs()}
    retnet = by_name["retnet"]
    for shape, schedule in ((Shape(4, 8192, 16, 128, 128, "bfloat16"), "fused"),
                            (Shape(8, 2048, 16, 64, 64, "bfloat16"), "fused"),
                            (Shape(1, 32768, 16, 128, 128, "bfloat16"), "split"),
                            (Shape(2, 64, 4, 128, 128, "float32"), "split")):
        config = retnet.default_config(shape, "fwd")
        assert config[tuning.SCHEDULE] == schedule and config in retnet.tuning_space(shape, "fwd")
        assert tuning.phase_stages(retnet.module, "fwd", config) == (
            ("states_output",) if schedule == "fused" else ("states", "output"))
        assert {"states_block_v", "output_block_v", "states_output_block_v"} <= set(config)
    fused = retnet.default_config(Shape(4, 8192, 16, 128, 128, "bfloat16"), "fwd")
    assert (fused["states_output_block_v"], fused["states_output_threads"]) == (64, 256)
    for name in ("gdn", "gla", "sla_gdn", "sla_gla"):
        config = by_name[name].default_config(Shape(4, 8192, 16, 128, 128, "bfloat16"), "fwd")
        assert tuning.SCHEDULE not in config and not tuning.schedules(by_name[name].module, "fwd")
    assert tuning.SCHEDULE not in retnet.default_config(Shape(4, 8192, 16, 128, 128, "bfloat16"), "bwd")


def test_tilelang_default_narrows_the_sequential_stages_blocks_until_their_grid_fills_the_gpu():
    """states and bwd_dh run one CTA per (sequence, head, block of V): at one sequence of 16 heads block_v 64
    gives 32 CTAs for 132 SMs, so the default takes 16 (128 CTAs); the chunk-parallel stages keep their widest."""
    from sla_dsl.backends import SEQUENTIAL_PROGRAMS
    from sla_dsl.backends.tilelang import TileLangKernels, tuning

    kernels = TileLangKernels(next(s for s in seed_specs() if s.name == "gdn"))
    for shape, block in ((Shape(1, 32768, 16, 128, 128, "bfloat16"), 16),
                         (Shape(4, 8192, 16, 128, 128, "bfloat16"), 32),
                         (Shape(32, 2048, 16, 128, 128, "bfloat16"), 128),
                         (Shape(1, 64, 1, 128, 128, "float32"), 16)):
        assert tuning.sequential_block_v(shape) == block
        assert block == 16 or shape.B * shape.H * shape.V // block >= SEQUENTIAL_PROGRAMS
        config = kernels.default_config(shape, "bwd")
        assert config in kernels.tuning_space(shape, "bwd")
        assert config["bwd_states_block_v"] <= block and config["bwd_dh_block_v"] <= block
        assert config["bwd_wy_block_v"] == 64


def test_sigterm_ends_the_sweep_with_the_finished_tasks_and_a_summary(gla):
    """`timeout` around a sweep sends SIGTERM: the task under way ends unwritten, the finished ones keep their
    results (and tables, written as each ends), the summary says why, and the handler is restored after."""
    import signal

    from sla_dsl.autotune.runner import sigterm_stops_the_sweep

    kernels = FakeKernels(gla)
    tasks = [Task(kernels, gla, "triton", Shape(1, 32, 2, 8, 8, "float32"), phase) for phase in ("fwd", "bwd")]
    written = []

    def measure(task, config, precise=False):
        if task.phase == "bwd":
            os.kill(os.getpid(), signal.SIGTERM)
        return fake_measure(task, config, precise)

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_stops_the_sweep():
        report = sweep(tasks, measure=measure, verify=lambda t, c: verify_config(t, c, device="cpu"),
                       budget_seconds=60, on_result=written.append)
    assert signal.getsignal(signal.SIGTERM) is before
    assert [r.task.phase for r in written] == ["fwd"] and written[0].config is not None
    assert report.results[1].config is None and report.aborted.startswith("SIGTERM received")
    assert "ABORTED: SIGTERM received (0 later task(s) not run)" in report.summary()
