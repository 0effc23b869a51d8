"""No generated TileLang loop over a 2-D tile has its thread layout decided by a per-row fragment
(`sla_dsl.backends.tilelang.loop_layouts`): the seed specs, every decay x write x gates combination, the write gate
on beta and the feature maps."""

from __future__ import annotations

import dataclasses

import pytest

import sla_dsl
from sla_dsl import testing
from sla_dsl.backends.tilelang import generator
from sla_dsl.backends.tilelang.loop_layouts import row_fragment_loops
from sla_dsl.codegen import seed_specs
from sla_dsl.loader import load_spec

BASE = load_spec(sla_dsl.codegen.SEED_SPECS_DIR / "gla.yaml")
CASES = testing.all_combinations() + testing.beta_gate_cases() + testing.feature_map_cases()


def test_a_tile_loop_touching_only_per_row_fragments_is_found():
    source = """
    g_f = T.alloc_fragment((C,), "float32")
    y_f = T.alloc_fragment((C, K), "float32")
    d_s = T.alloc_shared((C, K), "float32")
    for i, d in T.Parallel(C, K):
        d_s[i, d] = d_s[i, d] * g_f[i]
    for i, d in T.Parallel(C, K):
        d_s[i, d] = d_s[i, d] * g_f[i] * y_f[i, d]
    for i, d in T.Parallel(C, K):
        d_s[i, d] = d_s[i, d] * 2.0
    """
    (loop,) = row_fragment_loops(source)
    assert loop.line == 5 and loop.fragments == ("g_f",)
    assert "per-row fragments g_f" in str(loop)


def test_a_name_reallocated_in_shared_memory_is_no_longer_a_fragment():
    source = """
    g_f = T.alloc_fragment((C,), "float32")
    g_f = T.alloc_shared((C,), "float32")
    for i, d in T.Parallel(C, K):
        D[i, d] = g_f[i]
    """
    assert row_fragment_loops(source) == []


@pytest.mark.parametrize("spec", seed_specs(), ids=lambda s: s.name)
def test_seed_specs_have_no_row_fragment_loops(spec):
    (source,) = generator.generate(spec).values()
    assert not row_fragment_loops(source), "\n".join(map(str, row_fragment_loops(source)))


@pytest.mark.parametrize("rec", CASES, ids=lambda r: f"{testing.combination_id(r)}-{r.feature_map_q.value}")
def test_every_combination_has_no_row_fragment_loops(rec):
    spec = dataclasses.replace(BASE, name="layout_" + testing.combination_id(rec).replace("-", "_"), recurrence=rec)
    (source,) = generator.generate(spec).values()
    assert not row_fragment_loops(source), "\n".join(map(str, row_fragment_loops(source)))
