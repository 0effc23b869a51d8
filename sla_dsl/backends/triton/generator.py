"""The Triton generator: one readable file per spec, `generated/triton/<spec name>.py`.

The file is the spec's specialisation of the shared stage templates (tpl_*.py, used by every spec, never
written per backbone): a FLAGS table of the spec's features (passed to every kernel as constexpr
arguments, so dead branches compile away), the spec's feature maps and their derivatives emitted as
@triton.jit functions (the named slots phi_q / dphi_q / phi_k / dphi_k the templates call), then the
common helpers and the four stage kernels. The host side (launches, workspaces, configs) is
`sla_dsl.backends.triton.runtime`, shared by all specs.
"""

from __future__ import annotations

from sla_dsl.backends.triton import tpl_bwd_dh, tpl_bwd_dqk, tpl_bwd_wy, tpl_common, tpl_output, tpl_prep, tpl_states
from sla_dsl.codegen import header
from sla_dsl.feature_maps import L2_NORM_EPS
from sla_dsl.spec import Decay, FeatureMap, Recurrence, Spec, WriteRule

DECAY_CODES = {Decay.NONE: 0, Decay.CONSTANT: 1, Decay.SCALAR: 2, Decay.VECTOR: 3}

# phi(x) and phi'(x) per feature map, as Triton expressions of x (exp() arguments kept <= 0).
FEATURE_MAP_CODE = {
    FeatureMap.IDENTITY: ("x", "tl.full(x.shape, 1.0, tl.float32)"),
    FeatureMap.ELU_PLUS_ONE: ("tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))",
                              "tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))"),
    FeatureMap.RELU: ("tl.maximum(x, 0.0)", "tl.where(x > 0, 1.0, 0.0)"),
    FeatureMap.SILU: ("x * _sigmoid(x)", "_sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x)))"),
    FeatureMap.SIGMOID: ("_sigmoid(x)", "_sigmoid(x) * (1.0 - _sigmoid(x))"),
}

STAGES = (tpl_common, tpl_prep, tpl_states, tpl_output, tpl_bwd_dh, tpl_bwd_dqk, tpl_bwd_wy)


def filename(spec: Spec) -> str:
    return f"{spec.name}.py"


def flags(spec: Spec) -> dict:
    rec = spec.recurrence
    return {"DECAY": DECAY_CODES[rec.decay], "IS_DELTA": rec.write is WriteRule.DELTA,
            "READ_GATE": rec.gates.read, "KEY_GATE": rec.write_gate_scales_key,
            "BETA_GATE": rec.write_gate_scales_beta, "L2_NORM": rec.qk_l2_norm, "EPS": L2_NORM_EPS,
            "FUSED_QK": fused_qk(rec)}


def fused_qk(rec: Recurrence) -> bool:
    """Whether the forward skips stage "prep": with an additive write and a decay known without a workspace
    (none or constant), prep would only write q' and k', which the states and output stages then compute in
    registers from the raw q, k and gates instead (one pass over q and k fewer; the SLA gates cost no pass)."""
    return rec.write is WriteRule.ADDITIVE and rec.decay in (Decay.NONE, Decay.CONSTANT)


def _feature_map(name: str, fmap: FeatureMap) -> str:
    phi, dphi = FEATURE_MAP_CODE[fmap]
    return (f"@triton.jit\ndef phi_{name}(x):\n    \"\"\"{fmap.value}\"\"\"\n    return {phi}\n\n\n"
            f"@triton.jit\ndef dphi_{name}(x):\n    return {dphi}\n")


def _source(spec: Spec) -> str:
    rec = spec.recurrence
    flag_lines = "\n".join(f"    {key!r}: {value!r}," for key, value in flags(spec).items())
    parts = [
        header(spec, "triton", "chunkwise forward and backward kernels"),
        f'"""{spec.name}: decay {rec.decay.value}, write {rec.write.value}, gates {rec.gates.value} '
        f'(write gate on {rec.write_gate_on.value}), feature maps q {rec.feature_map_q.value} / k '
        f'{rec.feature_map_k.value}, qk_l2_norm {rec.qk_l2_norm}.\n\n'
        "Kernels: prep_kernel (q', k', b, the in-chunk A and the delta rule's WY form), states_kernel (the\n"
        "sequential state pass), output_kernel (outputs, parallel over chunks), bwd_dh_kernel (reverse\n"
        "state-gradient pass), bwd_dqk_kernel (per-chunk gradients), bwd_wy_kernel (the WY form's gradients).\n"
        'Launched by sla_dsl.backends.triton.runtime with FLAGS as constexpr arguments.\n"""\n',
        "import triton\nimport triton.language as tl\n",
        f"# The spec's features, passed to every kernel as constexpr arguments.\nFLAGS = {{\n{flag_lines}\n}}\n",
        "\n@triton.jit\ndef _sigmoid(x):\n"
        "    e = tl.exp(-tl.abs(x))\n    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))\n",
        _feature_map("q", rec.feature_map_q),
        _feature_map("k", rec.feature_map_k),
    ]
    for stage in STAGES:
        parts.append(f"# ---- {stage.__name__.rsplit('.', 1)[-1]} " + "-" * 60 + "\n" + stage.SOURCE.strip("\n") + "\n")
    return "\n\n".join(p.rstrip("\n") + "\n" for p in parts)


def generate(spec: Spec) -> dict[str, str]:
    return {filename(spec): _source(spec)}


def phase_kernels(spec: Spec) -> dict[str, tuple[str, ...]]:
    """The kernels each phase launches (`runtime.phase_stages`; "bwd_states" runs states_kernel)."""
    from sla_dsl.backends.triton.runtime import PHASE_STAGES, phase_stages  # the runtime imports this module

    return {phase: tuple(dict.fromkeys(stage.removeprefix("bwd_") + "_kernel" if stage == "bwd_states"
                                       else stage + "_kernel" for stage in phase_stages(spec.recurrence, phase)))
            for phase in PHASE_STAGES}
