"""The spec language's definition: every field, its type, default, allowed values, documentation and example.

This one table drives the loader's checks, the JSON Schema (`spec.schema.json`) and the reference page
(`docs/spec-language.md`), so the three never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from sla_dsl.spec import (BetaForm, Decay, DecayForm, FeatureMap, Gates, OutputGate, OutputNorm, WriteGateOn,
                          WriteRule)


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED = _Required()


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # enum | bool | int | number | string | identifier | formula | feature_map | section
    doc: str
    example: str
    default: object = REQUIRED
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # inclusive
    positive: bool = False  # strictly greater than zero
    nullable: bool = False
    fields: tuple["Field", ...] = ()  # for sections

    def by_name(self) -> dict[str, "Field"]:
        return {f.name: f for f in self.fields}


def _values(enum_type) -> tuple[str, ...]:
    return tuple(member.value for member in enum_type)


LAYER_FIELDS = (
    Field("num_heads", "int", "Default number of heads of the layer (the constructor may override it).",
          "num_heads: 4", default=4, minimum=1),
    Field("expand_k", "number", "Key/query width as a fraction of the hidden size.", "expand_k: 0.5",
          default=1.0, positive=True),
    Field("expand_v", "number", "Value width as a fraction of the hidden size.", "expand_v: 2.0",
          default=1.0, positive=True),
    Field("decay_form", "enum",
          "How a data-dependent decay is computed from x. gdn: g = -exp(A_log) * softplus(x W_a + dt_bias) "
          "(scalar decay only); logsigmoid: g = logsigmoid(x W_g + b) / decay_normalizer; "
          "logsigmoid_low_rank: g = logsigmoid(x W_1 W_2 + b) / decay_normalizer (GLA). Only with decay "
          "scalar or vector; defaults to gdn (scalar) or logsigmoid_low_rank (vector).",
          "decay_form: logsigmoid_low_rank", default=None, choices=_values(DecayForm)),
    Field("decay_low_rank", "int", "Rank of the low-rank decay projection (logsigmoid_low_rank only).",
          "decay_low_rank: 16", default=16, minimum=1),
    Field("decay_normalizer", "number", "Divisor of the logsigmoid decay (logsigmoid forms only).",
          "decay_normalizer: 16", default=16.0, positive=True),
    Field("beta_form", "enum", "How beta is computed (delta rule only): sigmoid(x W_b), or 2 * sigmoid(x W_b) "
          "which allows negative eigenvalues.", "beta_form: sigmoid", default=None, choices=_values(BetaForm)),
    Field("short_conv", "bool", "Causal depthwise short convolution (with SiLU) on q, k and v before the "
          "recurrence.", "short_conv: true", default=False),
    Field("conv_size", "int", "Kernel size of the short convolution (short_conv only).", "conv_size: 4",
          default=4, minimum=2),
    Field("output_norm", "enum", "Per-head norm of the recurrence output. With a norm, the read gate is "
          "applied after it (a per-head norm would cancel a per-head scalar).", "output_norm: rmsnorm",
          default="rmsnorm", choices=_values(OutputNorm)),
    Field("output_gate", "enum", "Output gate from the layer input: o * swish(x W_g) or o * sigmoid(x W_g).",
          "output_gate: swish", default="swish", choices=_values(OutputGate)),
    Field("norm_eps", "number", "Epsilon of the output norm.", "norm_eps: 1.0e-5", default=1e-5, positive=True),
)

SPEC_FIELDS = (
    Field("name", "identifier", "The spec's name: lower case letters, digits and underscores; names the "
          "generated files.", "name: sla_gla"),
    Field("description", "string", "One line saying what the recurrence is.", "description: GLA with SLA gates",
          default=""),
    Field("decay", "enum", "How the state decays between tokens: none (a = 1); constant per head "
          "(decay_constant); scalar per token and head (g [B, T, H], log-space, g <= 0); vector per token, "
          "head and key channel (g [B, T, H, K]).", "decay: scalar", default="none", choices=_values(Decay)),
    Field("decay_constant", "formula", "The per-head decay gamma_h in (0, 1] as a formula of h (head index, "
          "0-based) and H (head count), or a number. Required with decay: constant, not allowed otherwise.",
          "decay_constant: 1 - 2**(-5 - h)", default=None),
    Field("write", "enum", "The write rule: additive (S += k v^T) or delta (S += beta k (v - S^T k)^T).",
          "write: delta", default="additive", choices=_values(WriteRule)),
    Field("gates", "enum", "SLA head gates (softmax over heads): read scales q by G^Q, write scales k by "
          "G^K.", "gates: both", default="none", choices=_values(Gates)),
    Field("write_gate_on", "enum", "With the delta rule and a write gate: whether G^K scales the key (in "
          "both the erase and the write term, the paper's form) or beta.", "write_gate_on: key",
          default=None, choices=_values(WriteGateOn)),
    Field("feature_map", "feature_map", "Feature map phi applied to q and k: one name for both, or a "
          "mapping {q: ..., k: ...}.", "feature_map: {q: silu, k: silu}", default="identity",
          choices=_values(FeatureMap)),
    Field("qk_l2_norm", "bool", "L2-normalise phi(q) and phi(k) per head (before the gates).",
          "qk_l2_norm: true", default=False),
    Field("scale", "number", "Output scale; null means K^-0.5.", "scale: 0.125", default=None, positive=True,
          nullable=True),
    Field("layer", "section", "The layer around the recurrence (projections, parametrisation, norms).",
          "layer: {num_heads: 4, expand_v: 2.0}", default={}, fields=LAYER_FIELDS),
)

ROOT = Field("spec", "section", "A gated linear-attention recurrence.", "", fields=SPEC_FIELDS)
