"""`sla_dsl.compile`: fla's calling conventions, and clear errors for bad arguments."""

import pytest
import torch

import sla_dsl
from sla_dsl.codegen import REPO_ROOT
from sla_dsl.reference import reference_forward

SPECS = REPO_ROOT / "specs"


def inputs(B=1, T=10, H=2, K=8, V=4, dtype=torch.float32):
    return (torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype),
            torch.randn(B, T, H, V, dtype=dtype))


def test_reference_op_matches_reference_and_differentiates():
    op = sla_dsl.compile(SPECS / "sla_gdn.yaml", backend="reference")
    q, k, v = (t.double().requires_grad_() for t in inputs())
    g = -torch.rand(1, 10, 2, dtype=torch.float64)
    beta, gq, gk = (torch.rand(1, 10, 2, dtype=torch.float64) for _ in range(3))
    h0 = torch.randn(2, 2, 8, 4, dtype=torch.float64)
    cu = torch.tensor([0, 3, 10])
    o, s = op(q, k, v, g=g, beta=beta, gq=gq, gk=gk, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_ref, s_ref = reference_forward(op.spec.recurrence, q, k, v, g=g, beta=beta, gq=gq, gk=gk, initial_state=h0,
                                     output_final_state=True, cu_seqlens=cu, form="recurrent")
    assert torch.allclose(o, o_ref) and torch.allclose(s, s_ref)
    assert s.shape == (2, 2, 8, 4) and s.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda q_: op(q_, k, v, g=g, beta=beta, gq=gq, gk=gk)[0], (q,))


def test_final_state_is_float32_for_half_inputs_and_none_unless_asked():
    op = sla_dsl.compile(SPECS / "retnet.yaml", backend="reference")
    q, k, v = inputs(dtype=torch.bfloat16)
    o, s = op(q, k, v)
    assert o.dtype == torch.bfloat16 and s is None
    _, s = op(q, k, v, output_final_state=True)
    assert s.dtype == torch.float32


@pytest.mark.parametrize("spec, change, message", [
    ("gla", dict(g=torch.zeros(1, 10, 2)), "g: expected a vector log-decay [B, T, H, K] = [1, 10, 2, 8] (the spec "
                                           "has decay: vector), got shape [1, 10, 2]"),
    ("gdn", dict(g=None), "g: expected a scalar log-decay [B, T, H] (the spec has decay: scalar), got None"),
    ("retnet", dict(g=torch.zeros(1, 10, 2)), "g: expected None (the spec has decay: constant, which takes no g), "
                                              "got shape [1, 10, 2]"),
    ("gdn", dict(beta=None), "beta: expected a tensor [B, T, H] = [1, 10, 2] (the spec has a delta write rule), got None"),
    ("sla_gla", dict(gq=None), "gq: expected a tensor [B, T, H] = [1, 10, 2] (the spec has a read gate), got None"),
    ("gla", dict(gk=torch.ones(1, 10, 2)), "gk: expected None (the spec has no write gate), got a tensor"),
    ("gla", dict(k=torch.zeros(1, 10, 2, 7)), "k: expected shape [1, 10, 2, 8], got shape [1, 10, 2, 7]"),
    ("gla", dict(v=torch.zeros(1, 9, 2, 4)), "v: expected shape [1, 10, 2, 4], got shape [1, 9, 2, 4]"),
    ("gla", dict(v=torch.zeros(1, 10, 2, 4, dtype=torch.float64)),
     "v: expected dtype torch.float32 (as q), got dtype torch.float64"),
    ("gla", dict(q=torch.zeros(10, 2, 8)), "q: expected a 4-d tensor [B, T, H, K], got shape [10, 2, 8]"),
    ("gla", dict(q=torch.zeros(1, 10, 2, 8, dtype=torch.int32)),
     "q: expected dtype float16, bfloat16, float32 or float64, got dtype torch.int32"),
    ("gla", dict(initial_state=torch.zeros(1, 2, 8, 5)),
     "initial_state: expected shape [1, 2, 8, 4], got shape [1, 2, 8, 5]"),
    ("gla", dict(initial_state=torch.zeros(1, 2, 8, 4, dtype=torch.bfloat16)),
     "initial_state: expected dtype float32 or float64, got dtype torch.bfloat16"),
    ("gla", dict(cu_seqlens=torch.tensor([0, 4, 9])),
     "cu_seqlens: expected non-decreasing boundaries from 0 to T = 10, got [0, 4, 9]"),
    ("gla", dict(cu_seqlens=torch.tensor([0.0, 10.0])), "cu_seqlens: expected dtype int32 or int64, got dtype "
                                                        "torch.float32"),
    ("gla", dict(scale=-1.0), "scale: expected None or a positive number, got -1.0"),
])
def test_bad_arguments_name_argument_expected_and_received(spec, change, message):
    op = sla_dsl.compile(SPECS / f"{spec}.yaml", backend="reference")
    q, k, v = inputs()
    rec = op.spec.recurrence
    args = dict(q=q, k=k, v=v)
    if rec.decay.value == "scalar":
        args["g"] = -torch.rand(1, 10, 2)
    if rec.decay.value == "vector":
        args["g"] = -torch.rand(1, 10, 2, 8)
    if rec.needs_beta:
        args["beta"] = torch.rand(1, 10, 2)
    if rec.gates.read:
        args["gq"] = torch.rand(1, 10, 2)
    if rec.gates.write:
        args["gk"] = torch.rand(1, 10, 2)
    args.update(change)
    with pytest.raises(ValueError) as info:
        op(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    assert str(info.value) == message


def test_batched_cu_seqlens_is_refused():
    op = sla_dsl.compile(SPECS / "retnet.yaml", backend="reference")
    q, k, v = inputs(B=2)
    with pytest.raises(ValueError, match=r"q: expected batch size 1 with cu_seqlens"):
        op(q, k, v, cu_seqlens=torch.tensor([0, 10]))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend: expected one of auto, reference, triton, tilelang, got 'cuda'"):
        sla_dsl.compile(SPECS / "retnet.yaml", backend="cuda")


def test_compile_reports_spec_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndecay: banana\n")
    with pytest.raises(sla_dsl.SpecError, match="bad.yaml:2: decay: 'banana' is not one of"):
        sla_dsl.compile(bad)
