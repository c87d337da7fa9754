"""DP twins of torch layers. `DP_LAYERS` is the one mapping torch layer -> DP layer."""

from __future__ import annotations

from torch import nn

from ._base import DPModule
from .conv import DPConv1d, DPConv2d, DPConv3d
from .embedding import DPEmbedding
from .linear import DPLinear
from .mha import DPMultiheadAttention
from .norm import DPGroupNorm, DPLayerNorm, DPRMSNorm
from .rnn import DPGRU, DPLSTM, DPRNN

DP_LAYERS: dict[type[nn.Module], type[DPModule]] = {
    nn.Linear: DPLinear,
    nn.Embedding: DPEmbedding,
    nn.LayerNorm: DPLayerNorm,
    nn.RMSNorm: DPRMSNorm,
    nn.GroupNorm: DPGroupNorm,
    nn.Conv1d: DPConv1d,
    nn.Conv2d: DPConv2d,
    nn.Conv3d: DPConv3d,
    nn.MultiheadAttention: DPMultiheadAttention,
    nn.RNN: DPRNN,
    nn.LSTM: DPLSTM,
    nn.GRU: DPGRU,
}

__all__ = [
    "DPModule",
    "DPLinear",
    "DPEmbedding",
    "DPLayerNorm",
    "DPRMSNorm",
    "DPGroupNorm",
    "DPConv1d",
    "DPConv2d",
    "DPConv3d",
    "DPMultiheadAttention",
    "DPRNN",
    "DPLSTM",
    "DPGRU",
    "DP_LAYERS",
]
