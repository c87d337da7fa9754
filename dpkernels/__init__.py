"""dpkernels: differentially private training at the cost of ordinary training.

Public API: `make_private`, the DP layers (`DPLinear`, ...), `set_backend` / `use_backend`, accounting.
"""

from . import api as api  # functional API for other libraries: api.per_sample_norms, api.clipped_sum
from . import data as data  # Poisson sampling: data.poisson_loader, data.PoissonBatchSampler
from . import pruning as pruning  # magnitude pruning: pruning.magnitude_masks, pruning.apply_masks
from .accounting import Accountant, get_epsilon, get_noise_multiplier
from .convert import make_private
from .engine import Engine
from .nn import DP_LAYERS, DPConv1d, DPConv2d, DPConv3d, DPEmbedding, DPGroupNorm, DPLayerNorm, DPLinear, DPRMSNorm
from .nn.mha import DPMultiheadAttention
from .nn.rnn import DPGRU, DPLSTM, DPRNN
from .nn.tap import tap_parameters  # opt-in for raw (1, ...) parameters broadcast over the batch
from .ops import available_backends, get_backend, set_backend, use_backend
from .optimizer import DPOptimizer

__version__ = "0.1.0"

__all__ = [
    "Accountant",
    "DPConv1d",
    "DPConv2d",
    "DPConv3d",
    "DPEmbedding",
    "DPGRU",
    "DPGroupNorm",
    "DPLayerNorm",
    "DPLSTM",
    "DPLinear",
    "DPMultiheadAttention",
    "DPOptimizer",
    "DPRMSNorm",
    "DPRNN",
    "DP_LAYERS",
    "Engine",
    "available_backends",
    "get_backend",
    "get_epsilon",
    "get_noise_multiplier",
    "make_private",
    "set_backend",
    "tap_parameters",
    "use_backend",
]
