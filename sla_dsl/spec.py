"""The intermediate form of a spec: typed, frozen dataclasses that every generator and reference consumes.

A spec has two halves. `Recurrence` is the kernel semantics (what the chunkwise kernels compute);
`LayerConfig` is the parametrisation around it (how the layer computes g, beta and the gates from its
input). Generators read only `Recurrence`; the module layer reads both.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from sla_dsl.formula import Formula


class Decay(enum.Enum):
    """How the state decays between tokens (natural-log decay g <= 0 everywhere)."""

    NONE = "none"  # a_t = 1
    CONSTANT = "constant"  # a_t = gamma_h, a formula of the head index
    SCALAR = "scalar"  # a_t = exp(g[b, t, h])
    VECTOR = "vector"  # a_t = diag(exp(g[b, t, h, :]))


class WriteRule(enum.Enum):
    ADDITIVE = "additive"  # S += k v^T
    DELTA = "delta"  # S += beta k (v - S^T k)^T


class Gates(enum.Enum):
    """Which SLA head gates (softmax over heads, [B, T, H] values) scale q and k."""

    NONE = "none"
    READ = "read"
    WRITE = "write"
    BOTH = "both"

    @property
    def read(self) -> bool:
        return self in (Gates.READ, Gates.BOTH)

    @property
    def write(self) -> bool:
        return self in (Gates.WRITE, Gates.BOTH)


class WriteGateOn(enum.Enum):
    """With the delta rule, the write gate scales the key (erase and write, the paper's form) or beta."""

    KEY = "key"
    BETA = "beta"


class FeatureMap(enum.Enum):
    IDENTITY = "identity"
    ELU_PLUS_ONE = "elu_plus_one"
    RELU = "relu"
    SILU = "silu"
    SIGMOID = "sigmoid"


class DecayForm(enum.Enum):
    """The layer's parametrisation of a data-dependent decay."""

    GDN = "gdn"  # g = -exp(A_log) * softplus(x W_a + dt_bias)            (scalar)
    LOGSIGMOID = "logsigmoid"  # g = logsigmoid(x W_g + b) / normalizer         (scalar or vector)
    LOGSIGMOID_LOW_RANK = "logsigmoid_low_rank"  # g = logsigmoid(x W1 W2 + b) / normalizer (GLA)


class BetaForm(enum.Enum):
    SIGMOID = "sigmoid"  # beta in (0, 1)
    SIGMOID2 = "sigmoid2"  # beta in (0, 2): allows negative eigenvalues of the transition


class OutputNorm(enum.Enum):
    NONE = "none"
    RMSNORM = "rmsnorm"  # per head, with a learned weight
    GROUPNORM = "groupnorm"  # per head (RetNet), mean-centred


class OutputGate(enum.Enum):
    NONE = "none"
    SWISH = "swish"  # o * silu(x W_g)
    SIGMOID = "sigmoid"  # o * sigmoid(x W_g)


@dataclass(frozen=True)
class Recurrence:
    """Kernel semantics, per head h with state S in R^{K x V}:

    q' = scale * G^Q * l2(phi_q(q)),   k' = G^K * l2(phi_k(k))   (G^K on beta instead when write_gate_on=beta)
    additive: S_t = a_t S_{t-1} + k'_t v_t^T
    delta:    S_t = a_t S_{t-1} + beta_t k'_t (v_t - (a_t S_{t-1})^T k'_t)^T
    o_t = S_t^T q'_t
    """

    decay: Decay
    decay_constant: Formula | None
    write: WriteRule
    gates: Gates
    write_gate_on: WriteGateOn
    feature_map_q: FeatureMap
    feature_map_k: FeatureMap
    qk_l2_norm: bool
    scale: float | None

    @property
    def needs_beta(self) -> bool:
        return self.write is WriteRule.DELTA

    @property
    def write_gate_scales_key(self) -> bool:
        return self.gates.write and (self.write is WriteRule.ADDITIVE or self.write_gate_on is WriteGateOn.KEY)

    @property
    def write_gate_scales_beta(self) -> bool:
        return self.gates.write and self.write is WriteRule.DELTA and self.write_gate_on is WriteGateOn.BETA

    def log_gammas(self, num_heads: int) -> list[float]:
        """Natural-log constant decay per head (CONSTANT decay only)."""
        assert self.decay is Decay.CONSTANT and self.decay_constant is not None
        return [math.log(self.decay_constant.evaluate_gamma(h, num_heads)) for h in range(num_heads)]

    def resolved_scale(self, head_dim_k: int) -> float:
        return self.scale if self.scale is not None else head_dim_k**-0.5


@dataclass(frozen=True)
class LayerConfig:
    num_heads: int
    expand_k: float
    expand_v: float
    decay_form: DecayForm | None  # None unless decay is scalar or vector
    decay_low_rank: int
    decay_normalizer: float
    beta_form: BetaForm | None  # None unless write is delta
    short_conv: bool
    conv_size: int
    output_norm: OutputNorm
    output_gate: OutputGate
    norm_eps: float


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    recurrence: Recurrence
    layer: LayerConfig
    source_path: str  # where it was loaded from, for messages and @generated headers
    source_sha256: str  # hash of the file's bytes: keys caches and tuned tables
