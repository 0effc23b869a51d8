"""The module layer: packed and padded sequences, incremental decoding, the read gate after the output norm,
fullgraph compile of the whole model (forward and backward) and dynamic shapes without recompiles.

Layers and models run in float64 on the reference backend, so equalities are tight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from sla_dsl.nn import LanguageModel, LMConfig, ShortConvolution, SpecAttention
from sla_dsl.testing import rel_error

SPECS = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "specs").glob("*.yaml"))
SPEC_IDS = [Path(p).stem for p in SPECS]
HIDDEN = 16
LENGTHS = (5, 9, 3)  # packed sequences of unequal lengths


def _spec(name: str) -> str:
    return SPECS[SPEC_IDS.index(name)]


def _layer(path: str, seed: int = 0) -> SpecAttention:
    torch.manual_seed(seed)
    layer = SpecAttention(path, hidden_size=HIDDEN, num_heads=2, backend="reference").double()
    with torch.no_grad():  # non-trivial norm weights and biases, so that they enter every comparison
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return layer


def _sequences(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, HIDDEN, generator=gen, dtype=torch.float64) for n in LENGTHS]


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_packed_and_left_padded_sequences_equal_separate_runs(path):
    layer = _layer(path)
    seqs = _sequences()
    separate = [layer(x, use_cache=True) for x in seqs]

    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    packed, packed_state = layer(torch.cat(seqs, 1), cu_seqlens=cu_seqlens, use_cache=True)
    _close(packed, torch.cat([y for y, _ in separate], 1))
    _close(packed_state["recurrent_state"], torch.cat([s["recurrent_state"] for _, s in separate]))
    if layer.use_short_conv:
        for i in range(3):  # q, k, v convolution states
            _close(packed_state["conv_state"][i], torch.cat([s["conv_state"][i] for _, s in separate]))

    longest = max(LENGTHS)
    padded = torch.zeros(len(seqs), longest, HIDDEN, dtype=torch.float64)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for i, x in enumerate(seqs):
        padded[i, longest - x.shape[1]:] = x[0]
        mask[i, longest - x.shape[1]:] = 1
    padded[mask == 0] = 7.0  # what padding holds must not matter
    out = layer(padded, attention_mask=mask)
    for i, (y, _) in enumerate(separate):
        _close(out[i, longest - y.shape[1]:], y[0])


@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_incremental_decoding_with_the_returned_state_equals_the_full_forward(path):
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(spec=path, hidden_size=HIDDEN, num_layers=2, num_heads=2,
                                   backend="reference")).double()
    ids = torch.randint(0, 256, (2, 11))
    full = model(ids).logits
    prefix = model(ids[:, :6], use_cache=True)
    logits, states = [prefix.logits], prefix.past_states
    for start, end in ((6, 7), (7, 9), (9, 10), (10, 11)):  # single tokens and a chunk of two
        step = model(ids[:, start:end], past_states=states, use_cache=True)
        logits.append(step.logits)
        states = step.past_states
    _close(torch.cat(logits, 1), full)


def test_read_gate_acts_after_the_per_head_output_norm():
    """A per-head norm divides out any per-head scalar, so a read gate inside the recurrence would be
    cancelled by it: W_GQ must still change the output (it is applied to the normed output)."""
    layer = _layer(_spec("sla_gla"))
    assert layer.read_gate_after_norm
    x = _sequences()[1]
    before = layer(x)
    with torch.no_grad():
        layer.gq_proj.weight.add_(torch.randn_like(layer.gq_proj.weight))
    after = layer(x)
    assert (after - before).norm() > 0.05 * before.norm()
    grad = torch.autograd.grad(layer(x).square().sum(), layer.gq_proj.weight)[0]
    assert grad.norm() > 0

    # Why: inside the recurrence the read gate is a per-(token, head) scalar on the output (S^T (G q) =
    # G S^T q), and the per-head norm divides it out.
    o = 30 * torch.randn(1, 7, 2, layer.head_v_dim, dtype=torch.float64)  # far above the norm's eps
    gq = torch.softmax(torch.randn(1, 7, 2, dtype=torch.float64), -1)
    torch.testing.assert_close(layer.o_norm(o * gq.unsqueeze(-1)), layer.o_norm(o), rtol=1e-4, atol=1e-4)


def test_short_convolution_is_a_causal_depthwise_conv1d():
    conv = ShortConvolution(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, groups=6)).transpose(1, 2)
    _close(conv(x)[0], expected)


def _model(path):
    torch.manual_seed(0)
    config = LMConfig(spec=path, hidden_size=HIDDEN, num_layers=1, num_heads=2, backend="reference")
    return LanguageModel(config)


def _loss_and_grads(model, ids, **kwargs):
    loss = model(ids, labels=ids.roll(-1, 1), **kwargs).loss
    params = [p for p in model.parameters()]
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_fullgraph_compiled_model_equals_eager(path):
    """The whole model (embeddings, every layer, the loss) traces as one graph, forward and backward, with
    padding and with packed sequences. aot_eager: what fullgraph needs (Dynamo + AOTAutograd) without the
    C++ build time of inductor, which tests/test_training.py exercises."""
    model = _model(path)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 256, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :4] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        eager, graph = _loss_and_grads(model, ids, **kwargs), _loss_and_grads(compiled, ids, **kwargs)
        torch.testing.assert_close(graph[0], eager[0])
        for a, b in zip(graph[1], eager[1]):
            torch.testing.assert_close(a, b)
    cu_seqlens = torch.tensor([0, 4, 13], dtype=torch.int32)
    packed = ids[:1]
    eager = _loss_and_grads(model, packed, cu_seqlens=cu_seqlens)
    graph = _loss_and_grads(compiled, packed, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(graph[0], eager[0])
    for a, b in zip(graph[1], eager[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_triton_backend_in_bf16_autocast_matches_the_reference(path):
    """The GPU training path on the CPU (Triton's interpreter): bf16 q, k, v from autocast next to float32
    decays, beta and gates, through the generated kernels; loss and gradients as the reference's."""
    results = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = LanguageModel(LMConfig(spec=path, hidden_size=32, num_layers=1, num_heads=2, backend=backend))
        ids = torch.randint(0, 256, (2, 40))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids.roll(-1, 1)).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=0)
    for grad, ref in zip(grads, ref_grads):
        assert rel_error(grad, ref) < 0.05


def test_new_batch_and_sequence_lengths_do_not_recompile():
    """After the first change of B and T (automatic dynamic shapes), the model's graph serves any B and T
    (above 1: torch.compile specialises sizes 0 and 1, so B = 1 gets a graph of its own)."""
    model = _model(_spec("sla_gdn"))  # every layer feature: short conv, gdn decay, beta, both gates
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for batch, length in ((2, 8), (3, 12)):
        _loss_and_grads(compiled, torch.randint(0, 256, (batch, length)))
    graphs = counters["stats"]["unique_graphs"]
    for batch, length in ((5, 17), (19, 40), (4, 3)):
        ids = torch.randint(0, 256, (batch, length))
        eager, graph = _loss_and_grads(model, ids), _loss_and_grads(compiled, ids)
        torch.testing.assert_close(graph[0], eager[0])
    assert counters["stats"]["unique_graphs"] == graphs


def test_labelled_logits_only_gives_the_same_loss_and_the_labelled_rows():
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(spec="specs/sla_gla.yaml", vocab_size=64, hidden_size=32, num_layers=1,
                                   num_heads=4, backend="reference")).double()
    inputs = torch.randint(64, (2, 12))
    labels = torch.full((2, 12), -100)
    labels[0, 3], labels[1, 7], labels[1, 11] = 5, 9, 60
    full = model(inputs, labels=labels)
    only = model(inputs, labels=labels, labelled_logits_only=True)
    assert only.logits.shape == (3, 64)
    torch.testing.assert_close(only.logits, full.logits[labels != -100])
    torch.testing.assert_close(only.loss, full.loss)
    with pytest.raises(ValueError, match="labelled_logits_only"):
        model(inputs, labelled_logits_only=True)
