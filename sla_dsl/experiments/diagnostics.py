"""Gate diagnostics of a trained model: how decided the SLA head gates are, and whether their weights survive.

Per layer with gates (SLA.md, "failure signs"):
    entropy fraction   H(G) / log H, H(G) = -sum_h G_h log G_h, averaged over the positions of a batch:
                       1 = uniform over heads (the gate does nothing), 0 = one-hot (winner takes all).
                       The paper's failure sign: staying above 0.9.
    weight norm        Frobenius norm of W_GQ (read) and W_GK (write); the failure sign: collapsing to zero.
"""

from __future__ import annotations

import math

import torch

from sla_dsl.nn import SpecAttention

UNIFORM_ENTROPY_FRACTION = 0.9  # above this the gate is called near uniform (SLA.md)
COLLAPSED_WEIGHT_NORM = 1e-3  # below this the gate's logits are ~0 for any input: the gate is uniform


def entropy_fraction(gate: torch.Tensor) -> float:
    """Mean over all leading positions of the entropy of `gate` [..., H] (rows sum to 1) divided by log H."""
    heads = gate.shape[-1]
    if heads < 2:
        raise ValueError(f"gate: expected at least 2 heads (the last axis) for an entropy over heads, got shape "
                         f"{list(gate.shape)}")
    p = gate.double()
    entropy = -torch.special.xlogy(p, p).sum(-1)  # xlogy: 0 log 0 = 0, so a one-hot gate has entropy 0
    return float(entropy.mean() / math.log(heads))


@torch.no_grad()
def gate_diagnostics(model: torch.nn.Module, input_ids: torch.Tensor) -> list[dict]:
    """One row per `SpecAttention` layer that has SLA gates: entropy fractions of G^Q and G^K on `input_ids` and
    the norms of W_GQ and W_GK (None for a gate the spec does not have). Empty for a model without gates."""
    layers = [m for m in model.modules() if isinstance(m, SpecAttention) and (m.read_gate or m.write_gate)]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0]))
             for i, layer in enumerate(layers)]
    try:
        model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for i, layer in enumerate(layers):
        gq, gk = layer.head_gates(inputs[i])
        rows.append({
            "layer": i if layer.layer_idx is None else layer.layer_idx,
            "heads": layer.num_heads,
            "read_entropy_fraction": None if gq is None else entropy_fraction(gq),
            "write_entropy_fraction": None if gk is None else entropy_fraction(gk),
            "read_weight_norm": float(layer.gq_proj.weight.float().norm()) if layer.read_gate else None,
            "write_weight_norm": float(layer.gk_gate_proj.weight.float().norm()) if layer.write_gate else None,
        })
    return rows


def failure_signs(row: dict) -> list[str]:
    """The paper's failure signs in one `gate_diagnostics` row: 'G^Q near uniform', 'G^K collapsed', ..."""
    signs = []
    for side, gate in (("read", "G^Q"), ("write", "G^K")):
        fraction, norm = row[f"{side}_entropy_fraction"], row[f"{side}_weight_norm"]
        if fraction is not None and fraction > UNIFORM_ENTROPY_FRACTION:
            signs.append(f"{gate} near uniform")
        if norm is not None and norm < COLLAPSED_WEIGHT_NORM:
            signs.append(f"{gate} collapsed")
    return signs
