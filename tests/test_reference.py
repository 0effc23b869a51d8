"""The two reference forms (token-by-token and chunkwise) agree in float64 for every combination."""

import dataclasses

import pytest
import torch

from sla_dsl.reference import reference_forward
from sla_dsl.spec import Decay, FeatureMap, Gates, WriteGateOn, WriteRule
from sla_dsl.testing import all_combinations, combination_id, make_inputs, recurrence

COMBINATIONS = all_combinations()


def both_forms(rec, inputs, cu_seqlens=None, chunk_size=8):
    args = dict(inputs, output_final_state=True, cu_seqlens=cu_seqlens)
    return (reference_forward(rec, form="recurrent", **args),
            reference_forward(rec, form="chunkwise", chunk_size=chunk_size, **args))


def assert_close(a, b, tol=1e-12):
    assert ((a - b).norm() / b.norm()).item() < tol


@pytest.mark.parametrize("rec", COMBINATIONS, ids=combination_id)
def test_forms_agree_forward_and_backward(rec):
    inputs = make_inputs(rec, 2, 21, 3, 8, 6, dtype=torch.float64, seed=1)
    for t in inputs.values():
        t.requires_grad_()
    (o_rec, s_rec), (o_chk, s_chk) = both_forms(rec, inputs)
    assert_close(o_chk, o_rec)
    assert_close(s_chk, s_rec)
    assert o_rec.dtype == torch.float64 and s_rec.dtype == torch.float64
    weights = torch.randn_like(o_rec), torch.randn_like(s_rec)
    names = list(inputs)
    grads_rec = torch.autograd.grad((o_rec * weights[0]).sum() + (s_rec * weights[1]).sum(), list(inputs.values()))
    grads_chk = torch.autograd.grad((o_chk * weights[0]).sum() + (s_chk * weights[1]).sum(), list(inputs.values()))
    for name, a, b in zip(names, grads_chk, grads_rec):
        assert_close(a, b), name


@pytest.mark.parametrize("rec", [c for c in COMBINATIONS if c.gates is Gates.BOTH], ids=combination_id)
def test_variable_lengths_equal_separate_sequences(rec):
    lengths = [5, 17, 1, 9]
    inputs = make_inputs(rec, 1, sum(lengths), 2, 8, 4, dtype=torch.float64, seed=2, num_sequences=len(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    (o_rec, s_rec), (o_chk, s_chk) = both_forms(rec, inputs, cu_seqlens=cu)
    assert_close(o_chk, o_rec)
    assert_close(s_chk, s_rec)
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        piece = {n: (t[i:i + 1] if n == "initial_state" else t[:, start:end]) for n, t in inputs.items()}
        o_one, s_one = reference_forward(rec, **piece, output_final_state=True, form="recurrent")
        assert_close(o_chk[:, start:end], o_one)
        assert_close(s_chk[i:i + 1], s_one)


def test_empty_sequence_in_a_pack_keeps_its_initial_state():
    rec = recurrence(Decay.SCALAR, WriteRule.DELTA, Gates.NONE)
    inputs = make_inputs(rec, 1, 6, 2, 4, 4, dtype=torch.float64, num_sequences=3)
    o, s = reference_forward(rec, **inputs, output_final_state=True, cu_seqlens=torch.tensor([0, 6, 6, 6]))
    assert torch.equal(s[1:], inputs["initial_state"][1:])


def test_decay_matches_its_definition():
    """With q = e_0 and one token written at t = 0, o_t reads exactly the product of decays."""
    rec = recurrence(Decay.CONSTANT, WriteRule.ADDITIVE, Gates.NONE, scale=1.0)
    q = torch.zeros(1, 5, 2, 2, dtype=torch.float64)
    q[..., 0] = 1
    k = torch.zeros_like(q)
    k[:, 0, :, 0] = 1
    v = torch.ones(1, 5, 2, 1, dtype=torch.float64)
    o, _ = reference_forward(rec, q, k, v, form="chunkwise", chunk_size=2)
    gammas = torch.tensor([1 - 2 ** -3, 1 - 2 ** -4], dtype=torch.float64)
    expected = gammas[None, :] ** torch.arange(5, dtype=torch.float64)[:, None]
    assert torch.allclose(o[0, :, :, 0], expected)


def test_delta_rule_write_gate_on_key_versus_beta():
    """Writing v = 1 then v = 0 with the same key: gating the key scales the erase by gk^2 beta, gating beta
    by gk beta."""
    on_key = recurrence(Decay.NONE, WriteRule.DELTA, Gates.WRITE, qk_l2_norm=False, scale=1.0)
    on_beta = dataclasses.replace(on_key, write_gate_on=WriteGateOn.BETA)
    k = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(1, 2, 1, 2)
    v = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 2, 1, 1)
    half = torch.full((1, 2, 1), 0.5, dtype=torch.float64)
    o_key, _ = reference_forward(on_key, k, k, v, beta=half, gk=half, form="recurrent")
    o_beta, _ = reference_forward(on_beta, k, k, v, beta=half, gk=half, form="recurrent")
    assert o_key[0, :, 0, 0].tolist() == pytest.approx([0.25, 0.25 - 0.25 * 0.5 * 0.25])
    assert o_beta[0, :, 0, 0].tolist() == pytest.approx([0.25, 0.25 - 0.25 * 0.25])


@pytest.mark.parametrize("feature_map", list(FeatureMap))
def test_feature_maps_and_l2_norm(feature_map):
    rec = recurrence(Decay.SCALAR, WriteRule.ADDITIVE, Gates.READ, feature_map_q=feature_map,
                     feature_map_k=feature_map, qk_l2_norm=True)
    inputs = make_inputs(rec, 1, 11, 2, 8, 4, dtype=torch.float64)
    (o_rec, _), (o_chk, _) = both_forms(rec, inputs)
    assert_close(o_chk, o_rec)


def test_strong_decay_long_sequence_stays_finite():
    rec = recurrence(Decay.VECTOR, WriteRule.DELTA, Gates.BOTH)
    inputs = make_inputs(rec, 1, 256, 2, 8, 8, dtype=torch.float32, decay_strength=50.0)
    o, s = reference_forward(rec, **inputs, output_final_state=True, chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
