"""Feature maps phi and the L2 normalisation, as eager PyTorch (the reference's definition)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sla_dsl.spec import FeatureMap

# Added to the squared norm before the reciprocal square root; every backend uses the same value.
L2_NORM_EPS = 1e-6

TORCH_FEATURE_MAPS = {
    FeatureMap.IDENTITY: lambda x: x,
    FeatureMap.ELU_PLUS_ONE: lambda x: F.elu(x) + 1.0,
    FeatureMap.RELU: F.relu,
    FeatureMap.SILU: F.silu,
    FeatureMap.SIGMOID: torch.sigmoid,
}


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_NORM_EPS)
