"""Autograd Functions for Hugging Face layers that are not torch layers.

Conv1D (GPT-2): y = x W + b with W of shape (d_in, d_out), i.e. a Linear with weight W^T. The
Linear Function runs on the transposed view; norms are unchanged by the transpose and the clipped
sum sum_i c_i (G_i^T A_i)^T comes back in W's layout (``prev`` goes in as its transpose).

LlamaRMSNorm: y = w * xhat with xhat = (x / sqrt(mean(x^2) + eps)) computed in float32 and cast
back to x's dtype, exactly as transformers does; per-sample gradient sum_t xhat_t * g_t.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ._common import trainable
from .linear import LinearFunction
from .norm import _AffineNormFunction


class Conv1DFunction(LinearFunction):
    """LinearFunction applied to (x, W^T, b); the clipped weight sum is returned as (d_in, d_out)."""

    @staticmethod
    def clipped_sum(module: Any, uses, specs) -> dict[int, Tensor]:
        w = trainable(module, "weight")
        sw = specs.get(id(w)) if w is not None else None
        if sw is not None and sw.prev is not None:
            specs = {**specs, id(w): dataclasses.replace(sw, prev=sw.prev.t())}
        out = LinearFunction.clipped_sum(module, uses, specs)
        if w is not None and id(w) in out:
            out[id(w)] = out[id(w)].t().contiguous()
        return out


class LlamaRMSNormFunction(_AffineNormFunction):
    @staticmethod
    def op(module: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        # transformers' LlamaRMSNorm.forward, line for line (float32 statistics whatever x's dtype).
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        h = h.to(x.dtype)
        return h if weight is None else weight * h

    @staticmethod
    def to_rows(module: Any, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1, t.shape[-1])
