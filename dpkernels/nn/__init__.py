"""DP twins of torch layers. `DP_LAYERS` is the one mapping torch layer -> DP layer."""

from __future__ import annotations

from torch import nn

from ._base import DPModule
from .linear import DPLinear

DP_LAYERS: dict[type[nn.Module], type[DPModule]] = {
    nn.Linear: DPLinear,
}

__all__ = ["DPModule", "DPLinear", "DP_LAYERS"]
