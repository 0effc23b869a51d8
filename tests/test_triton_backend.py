"""The Triton backend against the float64 reference, under TRITON_INTERPRET=1 on CPU (fp32 unless noted).

Every decay x write x gates combination forward and backward, variable lengths with an initial state,
non-power-of-two head dims, the write gate on beta, feature maps, fp16, strong decay, the sub-chunked
vector-decay path (BT = 32 > BC = 16), the state passes split over blocks of K, and a new spec file compiled
with no new Python.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import sla_dsl
from sla_dsl import testing
from sla_dsl.backends.triton import generator
from sla_dsl.backends.triton.runtime import TritonKernels, default_config
from sla_dsl.codegen import generated_module
from sla_dsl.loader import load_spec
from sla_dsl.spec import Decay, FeatureMap, Gates, WriteRule

FP32 = testing.TOLERANCES[torch.float32]
BASE = load_spec(sla_dsl.codegen.SEED_SPECS_DIR / "gla.yaml")
SMALL = {"BT": 16}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SLA_DSL_CACHE", str(tmp_path_factory.getbasetemp() / "sla_dsl_cache"))


def kernels_for(rec, config=SMALL) -> TritonKernels:
    name = "test_" + testing.combination_id(rec).replace("-", "_")
    name += f"_{rec.feature_map_q.value}_{rec.feature_map_k.value}_{int(rec.qk_l2_norm)}"
    spec = dataclasses.replace(BASE, name=name, recurrence=rec)
    if config is not None and rec.decay is Decay.VECTOR:
        config = {"BC": 16, **config}  # the sub-chunk exists only for vector decays
    return TritonKernels(spec, generated_module(spec, "triton", generator.filename(spec)), config)


def check(rec, *shape, config=SMALL, tolerance=FP32, cu_seqlens=None, **make):
    errors = testing.compare_to_reference(rec, kernels_for(rec, config), testing.make_inputs(rec, *shape, **make),
                                          cu_seqlens=cu_seqlens)
    out_tol, grad_tol = tolerance
    bad = {name: err for name, err in errors.items()
           if not err <= (out_tol if name in ("o", "final_state") else grad_tol)}
    assert not bad, f"{testing.combination_id(rec)}: over tolerance {bad} (all: {errors})"
    return errors


@pytest.mark.parametrize("rec", testing.all_combinations(), ids=testing.combination_id)
def test_every_combination_forward_backward(rec):
    check(rec, 2, 40, 2, 16, 16)  # T = 40: not a multiple of the chunk


@pytest.mark.parametrize("decay", [Decay.CONSTANT, Decay.SCALAR, Decay.VECTOR])
@pytest.mark.parametrize("write", list(WriteRule))
def test_varlen_with_initial_state_and_odd_head_dims(decay, write):
    cu_seqlens = torch.tensor([0, 5, 40, 41, 77])  # one shorter than a chunk, one of a single token
    check(testing.recurrence(decay, write, Gates.BOTH), 1, 77, 2, 20, 12, cu_seqlens=cu_seqlens, num_sequences=4)


@pytest.mark.parametrize("write", list(WriteRule))
def test_an_empty_sequence_keeps_its_initial_state(write):
    # no chunk of it is walked: its final state is its initial state and dh0 its dht
    cu_seqlens = torch.tensor([0, 21, 21, 50])
    check(testing.recurrence(Decay.VECTOR, write, Gates.BOTH), 1, 50, 2, 16, 16, cu_seqlens=cu_seqlens,
          num_sequences=3)


@pytest.mark.parametrize("write", list(WriteRule))
def test_vector_decay_sub_chunks(write):
    """BT = 32 with BC = 16 takes the tensor-core path for the off-diagonal sub-blocks."""
    check(testing.recurrence(Decay.VECTOR, write, Gates.BOTH), 2, 70, 2, 16, 16, config={"BT": 32, "BC": 16})


@pytest.mark.parametrize("l2_norm,dqk_block", [(False, 16), (False, 32), (True, None)])
def test_vector_decay_key_blocks(l2_norm, dqk_block):
    """A vector decay with an additive write works by column blocks of K: stage "prep" sums A over blocks of
    tpl_prep.K_BLOCK (32), stage "bwd_dqk" makes dq', dk', db and the gates' row sums block by block
    (bwd_dqk_BK). K = 40 spans two blocks of 32 or three of 16, the last partly past K. L2 normalisation needs
    the whole row first: prep takes the norms in a pass of its own, bwd_dqk keeps whole rows."""
    rec = testing.recurrence(Decay.VECTOR, WriteRule.ADDITIVE, Gates.BOTH, qk_l2_norm=l2_norm,
                             feature_map_q=FeatureMap.ELU_PLUS_ONE, feature_map_k=FeatureMap.SILU)
    config = {"BT": 64, "BC": 16, **({"bwd_dqk_BK": dqk_block} if dqk_block else {})}
    check(rec, 1, 70, 2, 40, 24, config=config)


SEQUENTIAL_K_BLOCKS = {"states_BK": 32, "bwd_states_BK": 32, "bwd_dh_BK": 32}


@pytest.mark.parametrize("K", [60, 100])
@pytest.mark.parametrize("decay", [Decay.CONSTANT, Decay.SCALAR, Decay.VECTOR])
def test_sequential_passes_split_key_blocks(decay, K):
    """An additive write's state passes ("states" forward and backward, "bwd_dh") split K across programs in
    blocks of BK = 32 < K: K = 60 takes two blocks, K = 100 four, the last partly past K; variable lengths, an
    initial state and the final state's gradient cross the block boundaries. The constant decay runs the fused
    forward with L2 normalisation, whose norm spans every block of k."""
    rec = testing.recurrence(decay, WriteRule.ADDITIVE, Gates.BOTH, qk_l2_norm=decay is Decay.CONSTANT)
    cu_seqlens = torch.tensor([0, 5, 40, 77])
    check(rec, 1, 77, 2, K, 24, config=SEQUENTIAL_K_BLOCKS, cu_seqlens=cu_seqlens, num_sequences=3)


def test_sequential_key_blocks_in_space_and_defaults(monkeypatch):
    """The delta rule's v_new = u - w S reads every row of the state: its space holds only BK = padded K, and a
    forced narrower block is refused when the kernel is built. An additive write may take any K_BLOCKS value below
    the padded K, and on a GPU defaults to blocks of 64 from K = 128 on."""
    from sla_dsl.autotune import Shape
    from sla_dsl.backends.triton import runtime

    def key_block_values(rec, shape, phase):  # read from the space's factors: the product is millions of configs
        space = runtime.tuning_space(rec, shape, phase)
        return {setting[key] for factor in space.factors for setting in factor for key in SEQUENTIAL_K_BLOCKS
                if key in setting}

    delta = testing.recurrence(Decay.SCALAR, WriteRule.DELTA, Gates.NONE)
    additive = testing.recurrence(Decay.SCALAR, WriteRule.ADDITIVE, Gates.NONE)
    shape = Shape(2, 256, 4, 100, 64, "bfloat16")
    for phase in ("fwd", "bwd"):
        assert key_block_values(delta, shape, phase) == {128}
        assert key_block_values(additive, shape, phase) == {32, 64, 128}
    with pytest.raises(Exception, match="reads every row of S"):
        check(delta, 1, 20, 1, 40, 16, config=SEQUENTIAL_K_BLOCKS)

    monkeypatch.setattr(runtime, "interpreting", lambda: False)  # the interpreter keeps one block
    for rec, K, block in ((additive, 128, 64), (additive, 64, 64), (delta, 128, 128)):
        shape = Shape(4, 8192, 16, K, K, "bfloat16")
        cfg = default_config(rec, shape, "bwd")
        assert (cfg["bwd_states_BK"], cfg["bwd_dh_BK"]) == (block, block), (rec, K, cfg)
        assert default_config(rec, shape, "fwd")["states_BK"] == block
        assert cfg in runtime.tuning_space(rec, shape, "bwd")


@pytest.mark.parametrize("rec", testing.beta_gate_cases(), ids=testing.combination_id)
def test_write_gate_on_beta(rec):
    assert rec.write_gate_scales_beta
    check(rec, 2, 40, 2, 16, 16)


@pytest.mark.parametrize("rec", testing.feature_map_cases(), ids=testing.feature_map_id)
def test_feature_maps(rec):
    check(rec, 2, 40, 2, 16, 16)


def test_feature_map_with_vector_delta():
    rec = testing.recurrence(Decay.VECTOR, WriteRule.DELTA, Gates.READ, feature_map_q=FeatureMap.ELU_PLUS_ONE,
                             feature_map_k=FeatureMap.SILU)
    check(rec, 2, 40, 2, 16, 16)


@pytest.mark.parametrize("write", list(WriteRule))
def test_fp16(write):
    check(testing.recurrence(Decay.VECTOR, write, Gates.BOTH), 2, 40, 2, 16, 16, dtype=torch.float16,
          tolerance=testing.TOLERANCES[torch.float16])


@pytest.mark.parametrize("decay", [Decay.SCALAR, Decay.VECTOR])
def test_strong_decay_stays_finite(decay):
    rec = testing.recurrence(decay, WriteRule.DELTA, Gates.BOTH)
    kernels = kernels_for(rec, {"BT": 32})  # kernels_for adds BC = 16 for the vector decay
    inputs = testing.make_inputs(rec, 1, 160, 1, 16, 16, decay_strength=200.0)
    errors = testing.compare_to_reference(rec, kernels, inputs)
    assert all(math.isfinite(e) for e in errors.values()), errors
    assert errors["o"] <= 1e-4 and errors["final_state"] <= 1e-4, errors


def test_no_final_state_and_no_initial_state():
    rec = testing.recurrence(Decay.SCALAR, WriteRule.DELTA, Gates.NONE)
    inputs = testing.make_inputs(rec, 2, 40, 2, 16, 16, initial_state=False)
    errors = testing.compare_to_reference(rec, kernels_for(rec), inputs, output_final_state=False)
    assert max(errors.values()) <= 1e-5, errors


def test_default_config_and_tuning_space():
    from sla_dsl.autotune import Shape
    from sla_dsl.backends.triton import runtime

    from sla_dsl.backends.triton import tpl_bwd_dqk

    for rec in (testing.recurrence(Decay.VECTOR, WriteRule.DELTA, Gates.BOTH),
                testing.recurrence(Decay.VECTOR, WriteRule.ADDITIVE, Gates.BOTH),
                testing.recurrence(Decay.SCALAR, WriteRule.ADDITIVE, Gates.NONE)):
        for K, V in ((16, 16), (60, 100), (128, 128), (256, 256)):
            for dtype in ("bfloat16", "float32"):
                for phase in ("fwd", "bwd"):
                    shape = Shape(2, 256, 4, K, V, dtype)
                    cfg = default_config(rec, shape, phase)
                    space = runtime.tuning_space(rec, shape, phase)
                    assert cfg in space, (rec, shape, phase, cfg)
                    assert ("BC" in cfg) == (rec.decay is Decay.VECTOR)
                    assert cfg["BT"] % cfg.get("BC", 1) == 0
                    stages = runtime.phase_stages(rec, phase)
                    assert all(f"{stage}_num_warps" in cfg for stage in stages)
                    assert ("bwd_wy_num_warps" in cfg) == (phase == "bwd" and rec.write is WriteRule.DELTA)
                    # only the vector decay's additive write works by key blocks in bwd_dqk
                    assert ("bwd_dqk_BK" in cfg) == (phase == "bwd" and tpl_bwd_dqk.splits_keys(rec))
                    assert all(runtime.stage_options(cfg, s)["BV"] <= runtime.padded(V) for s in stages)
                    # dot_precision is a shared setting, the first factor (walking the product took most of a minute)
                    assert all(s["dot_precision"] == "ieee" for s in space.factors[0]) == (dtype == "float32")


def test_default_sequential_v_blocks_narrow_when_few_sequences_would_leave_sms_idle(monkeypatch):
    from sla_dsl.autotune import Shape
    from sla_dsl.backends.triton import runtime

    monkeypatch.setattr(runtime, "interpreting", lambda: False)  # the rule is for GPUs; the interpreter keeps BV
    rec = testing.recurrence(Decay.SCALAR, WriteRule.DELTA, Gates.NONE)
    wide = default_config(rec, Shape(4, 8192, 16, 128, 128, "bfloat16"), "bwd")
    narrow = default_config(rec, Shape(1, 32768, 16, 128, 128, "bfloat16"), "bwd")
    assert (wide["bwd_dh_BV"], wide["bwd_states_BV"]) == (32, 32)  # 4 * 16 * 4 = 256 programs
    assert (narrow["bwd_dh_BV"], narrow["bwd_states_BV"]) == (16, 16)  # 1 * 16 * 8 = 128: as many as it gets
    assert narrow in runtime.tuning_space(rec, Shape(1, 32768, 16, 128, 128, "bfloat16"), "bwd")


def test_config_override_names_unknown_keys_and_keeps_the_rest_default():
    rec = testing.recurrence(Decay.SCALAR, WriteRule.ADDITIVE, Gates.NONE)
    q = torch.zeros(1, 32, 2, 16)
    kernels = kernels_for(rec, {"BT": 32, "states_BV": 16})
    cfg = kernels._config(q, q, None, "fwd", None)
    assert cfg["BT"] == 32 and cfg["states_BV"] == 16 and "states_num_warps" in cfg
    with pytest.raises(ValueError, match=r"triton config: unknown keys \['BC'\]"):
        kernels_for(rec, None)._config(q, q, None, "fwd", {"BC": 16})


def test_generated_files_are_deterministic_and_headed():
    spec = load_spec(sla_dsl.codegen.SEED_SPECS_DIR / "sla_gdn.yaml")
    first, second = generator.generate(spec), generator.generate(spec)
    assert first == second and list(first) == ["sla_gdn.py"]
    text = first["sla_gdn.py"]
    assert text.startswith("# @generated by sla_dsl from spec 'sla_gdn'")
    assert "make_block_ptr" not in text and "autotune" not in text


def test_new_spec_file_compiles_and_runs(tmp_path):
    path = tmp_path / "my_hybrid.yaml"
    path.write_text(
        "name: my_hybrid\ndescription: vector decay + delta rule + SLA read gate + elu feature map\n"
        "decay: vector\nwrite: delta\ngates: both\nwrite_gate_on: beta\n"
        "feature_map: {q: elu_plus_one, k: silu}\nqk_l2_norm: true\n"
        "layer:\n  num_heads: 2\n  expand_k: 1.0\n  expand_v: 1.0\n  decay_form: logsigmoid\n")
    op = sla_dsl.compile(str(path), backend="triton")
    rec = op.spec.recurrence
    inputs = testing.make_inputs(rec, 1, 24, 2, 16, 16)
    q, k, v = (inputs[n].requires_grad_() for n in ("q", "k", "v"))
    o, final = op(q, k, v, g=inputs["g"], beta=inputs["beta"], gq=inputs["gq"], gk=inputs["gk"],
                  initial_state=inputs["initial_state"], output_final_state=True)
    (o.sum() + final.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()
    errors = testing.compare_to_reference(rec, op.kernels_for("triton"), inputs)
    assert max(errors.values()) <= 1e-5, errors


def test_delta_rule_at_chunk_64():
    """The blocked WY inverse over 64 rows (four 16-row blocks, two doubling steps). Right under the interpreter;
    kept out of the GPU's space by runtime.MAX_DELTA_BT, where Triton 3.6 computes it wrongly."""
    check(testing.recurrence(Decay.SCALAR, WriteRule.DELTA, Gates.BOTH), 1, 70, 1, 16, 16, config={"BT": 64})
