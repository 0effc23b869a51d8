"""The TileLang backend against the float64 reference on CPU: the generated kernels compiled by TileLang's C
target (`sla_dsl.backends.tilelang.cpu_emulation`), fp32 (and fp16 once), small shapes, outputs poisoned
before each run.

Every decay x write x gates combination forward and backward; variable lengths with an initial state; T not a
multiple of the chunk; several blocks of V in every stage; head dims 12 to 48, powers of two or not; the write
gate on beta; feature maps and L2 normalisation; strong decay; no initial or final state. What the emulation cannot judge (layouts,
pipelining, warp-level reductions on the H100) is the GPU suite's (`python -m sla_dsl gpu-check`).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import sla_dsl
from sla_dsl import testing
from sla_dsl.codegen import generated_module
from sla_dsl.loader import load_spec
from sla_dsl.spec import Decay, FeatureMap, Gates, WriteRule

pytest.importorskip("tilelang")

FP32 = testing.TOLERANCES[torch.float32]
BASE = load_spec(sla_dsl.codegen.SEED_SPECS_DIR / "gla.yaml")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SLA_DSL_CACHE", str(tmp_path_factory.getbasetemp() / "sla_dsl_cache"))


def small_config(module, chunk: int = 16, block_v: int = 16, schedule: str = "split") -> dict:
    """Every stage of both phases at `chunk` with V in blocks of `block_v` (two or more blocks of V below); a
    forward with two schedules runs `schedule`."""
    from sla_dsl.backends.tilelang import tuning

    config = {"chunk": chunk}
    if tuning.schedules(module, "fwd"):
        config[tuning.SCHEDULE] = schedule
    for stage in tuning.phase_stages(module, "fwd") + tuning.phase_stages(module, "bwd"):
        config.update({f"{stage}_block_v": block_v, f"{stage}_threads": 64, f"{stage}_num_stages": 1})
    return config


def kernels_for(rec, **config):
    from sla_dsl.backends.tilelang import TileLangKernels, generator

    name = "test_tl_" + testing.combination_id(rec).replace("-", "_")
    name += f"_{rec.feature_map_q.value}_{rec.feature_map_k.value}_{int(rec.qk_l2_norm)}"
    spec = dataclasses.replace(BASE, name=name, recurrence=rec)
    module = generated_module(spec, "tilelang", generator.filename(spec))
    return TileLangKernels(spec, config=small_config(module, **config))


def fusable(rec) -> bool:
    from sla_dsl.backends.tilelang import generator

    return generator.fusable(dataclasses.replace(BASE, recurrence=rec))


def check(rec, *shape, tolerance=FP32, cu_seqlens=None, config=None, ran=None, **make):
    """`ran`: a kernel the forward or backward must have run (compiled)."""
    kernels = kernels_for(rec, **(config or {}))
    errors = testing.compare_to_reference(rec, kernels, testing.make_inputs(rec, *shape, **make),
                                          cu_seqlens=cu_seqlens)
    assert ran is None or any(key[0] == ran for key in kernels._compiled), (ran, list(kernels._compiled))
    out_tol, grad_tol = tolerance
    bad = {name: err for name, err in errors.items()
           if not err <= (out_tol if name in ("o", "final_state") else grad_tol)}
    assert not bad, f"{testing.combination_id(rec)}: over tolerance {bad} (all: {errors})"
    return errors


@pytest.mark.parametrize("rec", testing.all_combinations(), ids=testing.combination_id)
def test_every_combination_forward_backward(rec):
    # T = 40: not a multiple of the chunk; chunk 32: two sub-blocks of a vector decay; V = 32: two blocks of V
    check(rec, 2, 40, 2, 16, 32, config={"chunk": 32})


@pytest.mark.parametrize("rec", [rec for rec in testing.all_combinations() if fusable(rec)],
                         ids=testing.combination_id)
def test_fused_forward_every_combination_it_covers(rec):
    """The fused schedule (states_output) for every combination that has it: T not a multiple of the chunk, two
    blocks of V, with the initial and the final state; variable lengths with an empty and a one-token sequence."""
    check(rec, 2, 40, 2, 16, 32, config={"chunk": 32, "schedule": "fused"}, ran="states_output")
    cu_seqlens = torch.tensor([0, 5, 5, 6, 77])
    check(rec, 1, 77, 2, 48, 32, cu_seqlens=cu_seqlens, num_sequences=4, config={"chunk": 16, "schedule": "fused"},
          ran="states_output")


def test_fused_forward_with_feature_maps_and_l2_norm():
    rec = testing.recurrence(Decay.SCALAR, WriteRule.ADDITIVE, Gates.BOTH, feature_map_q=FeatureMap.ELU_PLUS_ONE,
                             feature_map_k=FeatureMap.SIGMOID, qk_l2_norm=True)
    check(rec, 2, 40, 2, 20, 12, config={"chunk": 16, "schedule": "fused"}, ran="states_output")
    check(rec, 2, 40, 2, 16, 16, dtype=torch.float16, tolerance=testing.TOLERANCES[torch.float16],
          config={"chunk": 32, "schedule": "fused"}, ran="states_output")


@pytest.mark.parametrize("write", list(WriteRule))
@pytest.mark.parametrize("decay", [Decay.CONSTANT, Decay.SCALAR, Decay.VECTOR])
def test_varlen_with_initial_state_and_wider_heads(decay, write):
    cu_seqlens = torch.tensor([0, 5, 40, 41, 77])  # one shorter than a chunk, one of a single token
    check(testing.recurrence(decay, write, Gates.BOTH), 1, 77, 2, 48, 32, cu_seqlens=cu_seqlens, num_sequences=4,
          config={"chunk": 64})


@pytest.mark.parametrize("write", list(WriteRule))
@pytest.mark.parametrize("fmap", [FeatureMap.ELU_PLUS_ONE, FeatureMap.SIGMOID, FeatureMap.SILU])
def test_head_dims_not_multiples_of_16(fmap, write):
    """K = 20 and V = 12 run as 32 and 16: q and k padded with an input whose feature map is 0 (phi(0) is 1 for
    elu + 1, 1/2 for sigmoid), g, v and the states with zeros; with the L2 norm over the real channels only."""
    rec = testing.recurrence(Decay.VECTOR, write, Gates.BOTH, feature_map_q=fmap, feature_map_k=fmap,
                             qk_l2_norm=True)
    cu_seqlens = torch.tensor([0, 9, 40, 70])
    check(rec, 1, 70, 2, 20, 12, cu_seqlens=cu_seqlens, num_sequences=3, config={"chunk": 32})


@pytest.mark.parametrize("write", list(WriteRule))
@pytest.mark.parametrize("decay", [Decay.CONSTANT, Decay.VECTOR])
def test_an_empty_sequence_keeps_its_initial_state(decay, write):
    # the sequential stages walk no chunk of it (their pipelined loops' prologue and epilogue included): its final
    # state is its initial state and dh0 its dht; its neighbours' chunks are unaffected
    cu_seqlens = torch.tensor([0, 21, 21, 50])
    check(testing.recurrence(decay, write, Gates.BOTH), 1, 50, 2, 16, 32, cu_seqlens=cu_seqlens, num_sequences=3,
          config={"chunk": 16})


@pytest.mark.parametrize("write", list(WriteRule))
def test_chunk_16_one_sub_block_and_one_block_of_v(write):
    check(testing.recurrence(Decay.VECTOR, write, Gates.BOTH), 2, 70, 2, 32, 32, config={"chunk": 16,
                                                                                       "block_v": 32})


@pytest.mark.parametrize("rec", testing.beta_gate_cases(), ids=testing.combination_id)
def test_write_gate_on_beta(rec):
    assert rec.write_gate_scales_beta
    check(rec, 2, 40, 2, 16, 16)


@pytest.mark.parametrize("rec", testing.feature_map_cases(), ids=testing.feature_map_id)
def test_feature_maps(rec):
    check(rec, 2, 40, 2, 16, 16)


def test_feature_map_and_l2_norm_with_vector_delta():
    rec = testing.recurrence(Decay.VECTOR, WriteRule.DELTA, Gates.READ, feature_map_q=FeatureMap.ELU_PLUS_ONE,
                             feature_map_k=FeatureMap.SILU, qk_l2_norm=True)
    check(rec, 2, 40, 2, 16, 16)


@pytest.mark.parametrize("write", list(WriteRule))
def test_fp16_inputs_accumulate_in_fp32(write):
    check(testing.recurrence(Decay.VECTOR, write, Gates.BOTH), 2, 40, 2, 16, 16, dtype=torch.float16,
          tolerance=testing.TOLERANCES[torch.float16], config={"chunk": 32})


@pytest.mark.parametrize("decay", [Decay.SCALAR, Decay.VECTOR])
def test_strong_decay_stays_finite(decay):
    rec = testing.recurrence(decay, WriteRule.DELTA, Gates.BOTH)
    inputs = testing.make_inputs(rec, 1, 160, 1, 16, 16, decay_strength=200.0)
    errors = testing.compare_to_reference(rec, kernels_for(rec, chunk=32), inputs)
    assert all(math.isfinite(e) for e in errors.values()), errors
    assert errors["o"] <= 1e-4 and errors["final_state"] <= 1e-4, errors


def test_no_final_state_and_no_initial_state():
    rec = testing.recurrence(Decay.SCALAR, WriteRule.DELTA, Gates.NONE)
    inputs = testing.make_inputs(rec, 2, 40, 2, 16, 16, initial_state=False)
    errors = testing.compare_to_reference(rec, kernels_for(rec), inputs, output_final_state=False)
    assert max(errors.values()) <= 1e-5, errors


def test_bfloat16_cpu_tensors_get_a_clear_error():
    """TileLang's C target has no bfloat16: the op says so, naming the argument, instead of a lowering error."""
    rec = testing.recurrence(Decay.SCALAR, WriteRule.ADDITIVE, Gates.NONE)
    inputs = testing.make_inputs(rec, 1, 20, 2, 16, 16, initial_state=False, dtype=torch.bfloat16)
    args = [inputs.get(n) for n in ("q", "k", "v", "g", "beta", "gq", "gk")]
    with pytest.raises(ValueError, match=r"q: expected dtype float16 or float32 for CPU tensors .* got dtype "
                                         r"torch.bfloat16 on cpu"):
        kernels_for(rec).forward(*args, None, None, 0.25, False)
