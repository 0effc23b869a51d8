"""Autotuning: per-GPU tuned tables under autotune/, written by `python -m sla_dsl autotune` and read at call
time (never benchmarking then). See `sla_dsl.autotune.protocol` for what a backend provides."""

from sla_dsl.autotune.protocol import ConfigRejected, config_label, is_tunable, resolve_config
from sla_dsl.autotune.shapes import Shape, bucket, nearest, parse_shapes, reference_shapes
from sla_dsl.autotune.table import AutotuneWarning, clear_cache, lookup

__all__ = ["AutotuneWarning", "ConfigRejected", "Shape", "bucket", "clear_cache", "config_label", "is_tunable",
           "lookup", "nearest", "parse_shapes", "reference_shapes", "resolve_config"]
