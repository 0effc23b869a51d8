"""sla-dsl: a compiler-first kernel DSL for gated linear attention with SLA head gates."""

from sla_dsl.loader import SpecError, load_spec, parse_spec
from sla_dsl.ops import SpecOp, compile  # noqa: A004 -- the public entry point is named like torch.compile

__all__ = ["SpecError", "SpecOp", "compile", "load_spec", "parse_spec"]
