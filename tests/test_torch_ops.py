"""The registered torch ops: opcheck, fullgraph torch.compile equal to eager, no recompiles on new B or T."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import sla_dsl
from sla_dsl.testing import make_inputs
from sla_dsl.torch_ops import get_op, op_name

SPECS = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "specs").glob("*.yaml"))
SPEC_IDS = [Path(p).stem for p in SPECS]
NAMES = ("q", "k", "v", "g", "beta", "gq", "gk", "initial_state")
# The Triton backend runs on CPU under TRITON_INTERPRET=1 (set in conftest.py) once its module exists.
BACKENDS = ["reference"] + [b for b in ("triton",) if importlib.util.find_spec(f"sla_dsl.backends.{b}") is not None]


def _op_args(rec, batch, length, *, heads=4, dim_k=8, dim_v=8, requires_grad=True, **kwargs):
    inputs = make_inputs(rec, batch, length, heads, dim_k, dim_v, **kwargs)
    args = [inputs.get(n) for n in NAMES]
    if requires_grad:
        args = [a.requires_grad_() if a is not None else None for a in args]
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_opcheck(path, backend):
    if not hasattr(importlib.import_module(f"sla_dsl.backends.{backend}"), "build"):
        pytest.skip(f"sla_dsl.backends.{backend} has no build() yet")
    op = sla_dsl.compile(path, backend=backend)
    torch_op = op.torch_op(torch.device("cpu"))
    rec = op.spec.recurrence
    args = _op_args(rec, 2, 11)
    torch.library.opcheck(torch_op.forward_op, (*args, None, 0.3, True))
    if backend != "reference":
        return  # interpreted kernels are slow on CPU: the variants below run for the reference only
    # no final state; packed sequences (B = 1) with one empty sequence
    torch.library.opcheck(torch_op.forward_op, (*_op_args(rec, 2, 9, initial_state=False), None, 0.5, False))
    packed = _op_args(rec, 1, 13, num_sequences=3)
    cu = torch.tensor([0, 5, 5, 13], dtype=torch.int32)
    torch.library.opcheck(torch_op.forward_op, (*packed, cu, 0.3, True))


def test_op_names_are_unique_per_spec_content_and_backend():
    specs = [sla_dsl.load_spec(p) for p in SPECS]
    names = {op_name(s, b) for s in specs for b in ("reference", "triton", "tilelang")}
    assert len(names) == 3 * len(specs)
    assert get_op(specs[0], "reference") is get_op(specs[0], "reference")
    assert all(n.replace("_", "").isalnum() for n in names)


def _loss_fn(op):
    def loss(q, k, v, g, beta, gq, gk, h0, cu_seqlens=None):
        o, state = op(q, k, v, g=g, beta=beta, gq=gq, gk=gk, initial_state=h0, output_final_state=True,
                      cu_seqlens=cu_seqlens)
        return (o * o.detach().sin()).sum() + (state * state.detach().cos()).sum()
    return loss


def _grads(fn, args, **kwargs):
    out = fn(*args, **kwargs)
    wanted = [a for a in args if a is not None]
    return out, torch.autograd.grad(out, wanted)


def _assert_close(eager, compiled):
    (le, ge), (lc, gc) = eager, compiled
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    for a, b in zip(ge, gc):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_fullgraph_compile_matches_eager_without_recompiles(path):
    """torch.compile(fullgraph=True, dynamic=True): forward and gradients equal eager, one graph for every B, T."""
    op = sla_dsl.compile(path, backend="auto")  # CPU: the reference backend
    rec = op.spec.recurrence
    loss = _loss_fn(op)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for batch, length in ((2, 12), (3, 20), (2, 33)):
        args = _op_args(rec, batch, length)
        _assert_close(_grads(loss, args), _grads(compiled, args))
    assert counters["stats"]["unique_graphs"] == 1


def test_automatic_dynamic_stops_recompiling():
    """dynamic=None (the default): after B and T have each changed once, new B and T reuse the graph."""
    op = sla_dsl.compile(SPECS[SPEC_IDS.index("sla_gdn")], backend="reference")
    loss = _loss_fn(op)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss, fullgraph=True)
    for batch, length in ((2, 8), (2, 12), (3, 12)):
        _grads(compiled, _op_args(op.spec.recurrence, batch, length))
    graphs = counters["stats"]["unique_graphs"]
    for batch, length in ((5, 17), (6, 20), (2, 9)):  # B*T <= 128: inductor's own size guards hold
        args = _op_args(op.spec.recurrence, batch, length)
        _assert_close(_grads(loss, args), _grads(compiled, args))
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_with_cu_seqlens():
    """Packed sequences under compile: no .tolist() on the traced cu_seqlens, results equal eager."""
    op = sla_dsl.compile(SPECS[SPEC_IDS.index("sla_gla")], backend="reference")
    loss = _loss_fn(op)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for bounds in ([0, 4, 13], [0, 7, 9, 21]):
        cu = torch.tensor(bounds, dtype=torch.int32)
        args = _op_args(op.spec.recurrence, 1, bounds[-1], num_sequences=len(bounds) - 1)
        _assert_close(_grads(loss, args, cu_seqlens=cu), _grads(compiled, args, cu_seqlens=cu))


def test_no_final_state_maps_to_none_and_validation_still_runs():
    op = sla_dsl.compile(SPECS[SPEC_IDS.index("gla")], backend="reference")
    args = _op_args(op.spec.recurrence, 2, 5, requires_grad=False, initial_state=False)
    o, state = op(*args[:3], g=args[3])
    assert state is None and o.shape == args[2].shape
    with pytest.raises(ValueError, match="cu_seqlens"):
        op(*[a[:1] if a is not None else None for a in args[:3]], g=args[3][:1],
           cu_seqlens=torch.tensor([0, 3, 2, 5]))


def test_eager_path_matches_the_registered_op():
    """An eager call runs `sla_dsl.autograd`'s Function, not the dispatcher; its outputs and gradients (o only:
    the final state unused) equal the registered op's, called directly."""
    op = sla_dsl.compile(SPECS[SPEC_IDS.index("sla_gdn")], backend="reference")
    torch_op = op.torch_op(torch.device("cpu"))
    args = _op_args(op.spec.recurrence, 2, 10)
    kwargs = dict(g=args[3], beta=args[4], gq=args[5], gk=args[6], initial_state=args[7], output_final_state=True)
    o, state = op(*args[:3], **kwargs)
    assert o.grad_fn is not None and "EagerFunction" in type(o.grad_fn).__name__
    grads = torch.autograd.grad(o.square().sum(), [a for a in args if a is not None])
    scale = op.spec.recurrence.resolved_scale(args[0].shape[-1])
    o2, state2 = torch_op.forward_op(*args, None, scale, True)
    assert "EagerFunction" not in type(o2.grad_fn).__name__
    grads2 = torch.autograd.grad(o2.square().sum(), [a for a in args if a is not None])
    torch.testing.assert_close(o, o2)
    torch.testing.assert_close(state, state2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


def test_dispatcher_path_under_a_dispatch_mode(monkeypatch):
    """Under a dispatch mode (tracing, FakeTensorMode, a user's TorchDispatchMode) the call goes through the
    registered op, which the mode sees as one op; the eager path is not taken. Tensor subclasses (fake tensors)
    take the registered op too, whose fake implementation gives the output shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    import sla_dsl.torch_ops

    def refuse(*args):
        raise AssertionError("the eager path ran")

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    op = sla_dsl.compile(SPECS[SPEC_IDS.index("gla")], backend="reference")
    args = _op_args(op.spec.recurrence, 2, 10, requires_grad=False)
    expected, _ = op(*args[:3], g=args[3], initial_state=args[7])
    monkeypatch.setattr(sla_dsl.torch_ops.EagerFunction, "apply", refuse)
    seen = []
    with Recorder():
        o, _ = op(*args[:3], g=args[3], initial_state=args[7])
    assert any(name.startswith(f"sla_dsl.{op.torch_op(o.device).name}") for name in seen), seen[:5]
    torch.testing.assert_close(o, expected)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if a is not None else None for a in args]
        o, state = op(*fake[:3], g=fake[3], initial_state=fake[7], output_final_state=True)
    assert o.shape == args[2].shape and state.shape == args[7].shape


GPU_BACKENDS = ("triton", "tilelang")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: both backends' ops on CUDA tensors")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_opcheck_and_compile_on_gpu(path, backend):
    """On CUDA: opcheck of the op built from the generated kernels, and torch.compile(fullgraph=True) of a loss
    through it giving eager's gradients (same kernels either way, so exactly)."""
    op = sla_dsl.compile(path, backend=backend)
    rec = op.spec.recurrence
    args = [a.detach().cuda().requires_grad_(a.requires_grad) if a is not None else None
            for a in _op_args(rec, 2, 70, dim_k=64, dim_v=64)]
    torch.library.opcheck(op.torch_op(torch.device("cuda")).forward_op, (*args, None, 0.3, True))
    loss = _loss_fn(op)
    torch._dynamo.reset()
    _assert_close(_grads(loss, args), _grads(torch.compile(loss, fullgraph=True), args))
