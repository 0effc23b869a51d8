"""sla-dsl: a compiler-first kernel DSL for gated linear attention with SLA head gates."""

from sla_dsl.loader import SpecError, load_spec, parse_spec

__all__ = ["SpecError", "load_spec", "parse_spec"]
