"""Reference ops for the affine part of LayerNorm, RMSNorm and GroupNorm (plain PyTorch).

y = xhat * w + b with xhat the normalised input. With rows laid out as (B, T, C) (C the affine
channels: prod(normalized_shape) for LayerNorm/RMSNorm, the channels for GroupNorm; T every other
non-batch position), sample i's gradients are formed directly, (B, C) each:

    gw_i = sum_t xhat_it * g_it,       gb_i = sum_t g_it
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import acc_dtype, finish, kept


def affine_norms(xhat: Tensor, g: Tensor, *, weight: bool, bias: bool) -> tuple[Tensor | None, Tensor | None]:
    """Per-sample squared norms ||sum_t xhat_it * g_it||^2 (weight) and ||sum_t g_it||^2 (bias).

    xhat, g: (B, T, C). Returns (B,) tensors in float32 (float64 for float64 inputs), None where not asked.
    """
    dt = acc_dtype(xhat, g)
    gd = g.to(dt)
    w = (xhat.to(dt) * gd).sum(dim=1).square().sum(dim=1) if weight else None
    b = gd.sum(dim=1).square().sum(dim=1) if bias else None
    return w, b


def affine_clipped_sum(
    xhat: Tensor,
    g: Tensor,
    c: Tensor,
    *,
    weight: bool,
    bias: bool,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed_w: int = 0,
    seed_b: int = 0,
    prev_w: Tensor | None = None,
    prev_b: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Clipped, summed, noised affine gradients, (C,) each:

    weight: scale * (prev_w + sum_i c_i sum_t xhat_it * g_it + noise_std * z_w)
    bias:   scale * (prev_b + sum_i c_i sum_t g_it + noise_std * z_b)
    A sample with c_i = 0 adds exactly 0, even with non-finite rows (_common.kept).
    """
    dt = acc_dtype(xhat, g)
    drop = c == 0
    gs = kept(g, drop, dt, c)
    w = b = None
    if weight:
        xg = torch.einsum("btc,btc->c", kept(xhat, drop, dt), gs)
        w = finish(xg, prev_w, noise_std, scale, seed_w, fresh=True)
    if bias:
        b = finish(gs.sum(dim=(0, 1)), prev_b, noise_std, scale, seed_b, fresh=True)
    return w, b
