"""dpkernels: differentially private training at the cost of ordinary training.

Public API: `make_private`, the DP layers (`DPLinear`, ...), `set_backend`, accounting.
"""

from .accounting import Accountant, get_epsilon, get_noise_multiplier
from .convert import make_private
from .engine import DPOptimizer, Engine
from .nn import DP_LAYERS, DPLinear
from .ops import available_backends, get_backend, set_backend

__version__ = "0.1.0"

__all__ = [
    "Accountant",
    "DPLinear",
    "DPOptimizer",
    "DP_LAYERS",
    "Engine",
    "available_backends",
    "get_backend",
    "get_epsilon",
    "get_noise_multiplier",
    "make_private",
    "set_backend",
]
