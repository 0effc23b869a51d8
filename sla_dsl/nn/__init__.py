"""The module layer: `SpecAttention` (a spec's token-mixing layer) and a small causal `LanguageModel`."""

from sla_dsl.nn.layers import HeadNorm, ShortConvolution, SpecAttention
from sla_dsl.nn.model import LanguageModel, LMConfig, LMOutput, RMSNorm, SwiGLU

__all__ = ["HeadNorm", "LMConfig", "LMOutput", "LanguageModel", "RMSNorm", "ShortConvolution", "SpecAttention",
           "SwiGLU"]
