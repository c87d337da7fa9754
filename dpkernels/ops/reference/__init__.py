"""Plain-PyTorch reference ops: the ground truth every backend is tested against.

Every op works on any device and dtype. Norms and sums accumulate in float32 for
half inputs and in float64 for float64 inputs (so tests can compare in float64).

Shapes follow one convention: ``a`` is a layer input of shape (B, T, d), ``g`` the
gradient of the layer output, (B, T, p), where T collects every non-batch position
(sequence, pixels after unfold). Nothing here knows about modules or the engine.

Noise: every op that writes a gradient computes

    out = scale * (prev + sum_i c_i * grad_i + noise_std * z),   z ~ N(0, I)

with ``z`` drawn from a generator keyed by ``seed`` (one seed per output tensor),
``prev`` an optional accumulated sum (gradient accumulation, tied weights).
"""

from __future__ import annotations

from ._common import acc_dtype, add_noise, finish, gaussian
from .affine import affine_clipped_sum, affine_norms
from .bounds import (
    affine_norms_bound,
    bias_norms_bound,
    conv_norms_bound,
    embedding_linear_cross_bound,
    embedding_norms_bound,
    linear_norms_bound,
)
from .chacha import chacha20_blocks, secure_noise
from .conv import conv_clipped_sum, conv_norms, conv_rows, conv_unfold
from .embedding import embedding_clipped_sum, embedding_linear_cross, embedding_norms
from .linear import bias_clipped_sum, bias_norms, linear_clipped_sum, linear_norm_method, linear_norms

__all__ = [
    "affine_norms_bound",
    "bias_norms_bound",
    "conv_norms_bound",
    "embedding_linear_cross_bound",
    "embedding_norms_bound",
    "linear_norms_bound",
    "conv_clipped_sum",
    "conv_norms",
    "conv_rows",
    "conv_unfold",
    "acc_dtype",
    "add_noise",
    "affine_clipped_sum",
    "affine_norms",
    "bias_clipped_sum",
    "bias_norms",
    "embedding_clipped_sum",
    "embedding_linear_cross",
    "embedding_norms",
    "finish",
    "gaussian",
    "linear_clipped_sum",
    "linear_norm_method",
    "linear_norms",
    "chacha20_blocks",
    "secure_noise",
]
