"""Per-sample gradients of each op family by the suite's one oracle (tests/oracle.py), in float64.

An op's per-sample weight gradient given its input x_i and output gradient g_i is the gradient of
sum(layer(x_i) * g_i) with respect to the layer's parameters: a tiny float64 module per family runs
that through the oracle, one sample at a time, with torch's own forward (F.linear, F.conv*d,
F.embedding, the affine x * w + b). The result does not depend on the parameter values (the layers
are linear in them), so they are zeros (ones for the affine scale).
"""

from __future__ import annotations

from collections.abc import Callable

import oracle
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DT = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _Layer(nn.Module):
    def __init__(self, fn: Callable[..., Tensor], **params: Tensor):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            self.register_parameter(k, nn.Parameter(v))

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x, **dict(self.named_parameters()))


def _grads(layer: _Layer, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    return oracle.per_sample_grads(layer, lambda m, s: (m(s[0]) * s[1]).sum(), (x, g.to(DT)))


def linear(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(B, p, d) weight and (B, p) bias gradients: G_i^T A_i and sum_t g_it, for (B, T, d) a, (B, T, p) g."""
    d, p = a.shape[-1], g.shape[-1]
    layer = _Layer(lambda x, weight, bias: F.linear(x, weight, bias), weight=torch.zeros(p, d, dtype=DT),
                   bias=torch.zeros(p, dtype=DT))  # fmt: skip
    out = _grads(layer, a.to(DT), g)
    return out["weight"], out["bias"]


def conv(
    x: Tensor, g: Tensor, weight_shape: tuple[int, ...], stride=1, padding=0, dilation=1, groups=1, bias=True
) -> tuple[Tensor, Tensor | None]:
    """(B, *weight_shape) weight and (B, C_out) bias gradients (None without bias) of conv{1,2,3}d."""
    fn = CONV[x.dim() - 2]
    params = {"weight": torch.zeros(weight_shape, dtype=DT)}
    if bias:
        params["bias"] = torch.zeros(weight_shape[0], dtype=DT)
    layer = _Layer(lambda x, weight, bias=None: fn(x, weight, bias, stride, padding, dilation, groups), **params)
    out = _grads(layer, x.to(DT), g)
    return out["weight"], out.get("bias")


def embedding(ids: Tensor, g: Tensor, V: int, padding_idx: int | None) -> Tensor:
    """(B, V, D) weight gradients of the lookup of (B, T) ids (padding_idx's row never receives any)."""
    layer = _Layer(lambda x, weight: F.embedding(x, weight, padding_idx=padding_idx),
                   weight=torch.zeros(V, g.shape[-1], dtype=DT))  # fmt: skip
    return _grads(layer, ids, g)["weight"]


def affine(xhat: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C) weight and bias gradients of xhat * w + b (the affine part of the norm layers)."""
    C = g.shape[-1]
    layer = _Layer(lambda x, weight, bias: x * weight + bias, weight=torch.ones(C, dtype=DT),
                   bias=torch.zeros(C, dtype=DT))  # fmt: skip
    out = _grads(layer, xhat.to(DT), g)
    return out["weight"], out["bias"]
