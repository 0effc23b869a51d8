"""scripts/ab_generated.py: the snapshot of a revision's kernels and tables that its GPU A/B runs against (the
timing itself needs a GPU)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sla_dsl.autotune.shapes import Shape
from sla_dsl.codegen import seed_specs

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("ab_generated", REPO / "scripts" / "ab_generated.py")
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)


@pytest.fixture(scope="module")
def head_snapshot(tmp_path_factory):
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("needs the git repository")
    out = tmp_path_factory.mktemp("ab") / "base"
    ab.prepare("HEAD", out, "tilelang")
    return out


def test_prepare_writes_the_revisions_kernels_runtime_and_tables(head_snapshot):
    base = head_snapshot / "tilelang"
    for spec in seed_specs():
        committed = subprocess.run(["git", "show", f"HEAD:generated/tilelang/{spec.name}.py"], cwd=REPO,
                                   capture_output=True, text=True).stdout
        assert (base / f"{spec.name}.py").read_text() == committed
    runtime = subprocess.run(["git", "show", "HEAD:sla_dsl/backends/tilelang/__init__.py"], cwd=REPO,
                             capture_output=True, text=True).stdout
    assert (base / "runtime.py").read_text() == runtime
    tables = sorted(p.relative_to(base / "tables").as_posix() for p in (base / "tables").glob("*/*.json"))
    shipped = sorted(p.relative_to(REPO / "autotune").as_posix().replace("/tilelang/", "/")
                     for p in (REPO / "autotune").glob("*/tilelang/*.json"))
    assert tables == shipped and tables
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert (head_snapshot / "REVISION").read_text().strip() == head


def test_tuned_configs_come_from_the_nearest_bucket_of_that_gpus_table(head_snapshot):
    base = head_snapshot / "tilelang"
    gpu = next((base / "tables").iterdir()).name
    table = json.loads((base / "tables" / gpu / "gdn.json").read_text())
    key = next(iter(table["entries"]))
    entry = table["entries"][key]
    shape = Shape.from_key(key)
    # a length the table lacks still finds the stored bucket (same K, V and dtype)
    longer = dataclasses.replace(shape, T=shape.T * 2)
    assert ab._tuned(base, gpu, "gdn", longer) == {"fwd": entry["fwd"]["config"], "bwd": entry["bwd"]["config"]}
    assert ab._tuned(base, "No_Such_GPU", "gdn", shape) is None
    assert ab._tuned(base, gpu, "gdn", dataclasses.replace(shape, K=shape.K * 2)) is None


def test_settings_parse_as_numbers_or_names():
    assert ab._parse_sets(["states_num_stages=1", "PREC=tf32"]) == {"states_num_stages": 1, "PREC": "tf32"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        ab._parse_sets(["states_num_stages"])


def test_prepare_refuses_an_unknown_backend(tmp_path):
    with pytest.raises(SystemExit, match="--backend"):
        ab.prepare("HEAD", tmp_path, "cuda")


def test_the_base_side_runs_the_revisions_runtime(head_snapshot):
    """The base's kernels go through the base's host runtime (a change may move work between stages), loaded
    from the snapshot, not through the working tree's."""
    base = head_snapshot / "tilelang"
    runtime = ab._load_module(base / "runtime.py")
    module = ab._load_module(base / "gdn.py")
    spec = next(s for s in seed_specs() if s.name == "gdn")
    kernels = ab._base_kernels("tilelang", runtime, spec, module)
    assert type(kernels).__module__ == runtime.__name__ and kernels.module is module


def test_the_base_runtime_imports_its_own_template_modules(tmp_path):
    """The runtime reads host-side constants and predicates from its package's template modules; a change that
    renames or moves one (session 25: tpl_prep.K_BLOCK -> K_BLOCKS) must not break the base. The snapshot's copies
    serve the base's runtime while it loads, and the working tree's modules are back in place afterwards."""
    import sla_dsl.backends.triton as package
    from sla_dsl.backends.triton import tpl_prep as working_tree_prep

    ab.prepare("HEAD", tmp_path, "triton")
    snapshot = tmp_path / "triton" / "package" / "tpl_prep.py"
    snapshot.write_text(snapshot.read_text() + "\nBASE_ONLY_MARKER = 1\n")
    with ab._base_package("triton", snapshot.parent):
        runtime = ab._load_module(tmp_path / "triton" / "runtime.py")
    assert runtime.tpl_prep.BASE_ONLY_MARKER == 1
    assert package.tpl_prep is working_tree_prep and not hasattr(working_tree_prep, "BASE_ONLY_MARKER")
    assert sys.modules["sla_dsl.backends.triton.tpl_prep"] is working_tree_prep


def test_set_takes_several_settings_after_one_flag_or_repeated(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(ab, "run", lambda *args: calls.append(args))
    ab.main(["run", str(tmp_path), "gla", "--set", "bwd_chunk_block_v=64", "bwd_chunk_num_stages=1",
             "--set", "chunk=32", "--kernels", "3"])
    assert calls == [(tmp_path, ["gla"], "4x8192x16x128",
                      {"bwd_chunk_block_v": 64, "bwd_chunk_num_stages": 1, "chunk": 32}, 3)]


def test_run_refuses_kernels_with_loops_laid_out_a_row_per_thread(monkeypatch, tmp_path, head_snapshot):
    """The check runs before the GPU is looked for: here, on a CPU machine, it is what stops the run."""
    generated = tmp_path / "generated"
    (generated / "tilelang").mkdir(parents=True)
    source = (REPO / "generated" / "tilelang" / "gdn.py").read_text()
    assert not ab.row_fragment_problems("tilelang", ["gdn"])
    # the pathology of session 23's first A/B: a [C, K] loop whose only fragment is a per-row one
    (generated / "tilelang" / "gdn.py").write_text(source + '''
def extra(C, K):
    dot_q_f = T.alloc_fragment((C,), "float32")
    for i, d in T.Parallel(C, K):
        dqp_s[i, d] = dqp_s[i, d] * dot_q_f[i]
''')
    monkeypatch.setattr(ab, "GENERATED", generated)
    assert len(ab.row_fragment_problems("tilelang", ["gdn"])) == 1
    assert ab.row_fragment_problems("triton", ["gdn"]) == []
    with pytest.raises(SystemExit, match="(?s)one thread per row.*dot_q_f"):
        ab.run(head_snapshot, ["gdn"], "4x8192x16x128", {})
