"""Raw parameters broadcast over the batch: P of shape (1, *s) used as if it were (B, *s).

A model that adds a (1, N, D) position table to a (B, N, D) activation, or expands a (1, 1, D)
class token to the batch, lets autograd sum the output gradient over the batch before the
parameter sees it: the per-sample gradients are gone. Expanding P to the batch inside an
autograd Function,

    Y = expand(P, B):   Y_i = P for every sample i,

keeps them: the backward receives G = dL/dY of shape (B, *s), and G_i is sample i's gradient of
P. For a parameter used several times in one pass (or read in several places) the per-sample
gradient is the sum over uses, so with U uses stacked as (B, U, numel):

    norm:         ||sum_u G_ui||^2             (ops.bias_norms: ||sum_t g_t||^2)
    clipped sum:  sum_i c_i sum_u G_ui          (ops.bias_clipped_sum), reshaped to P's shape.

The same two helpers serve any parameter whose per-sample gradient arrives whole in a backward
(the learned key/value biases of nn.MultiheadAttention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import ops
from ._common import attach, first_order_only


class TapFunction(torch.autograd.Function):
    """y = P.expand(B, *s) for P of shape (1, *s); backward hands G (B, *s) to the engine, returns no grad for P."""

    @staticmethod
    def forward(ctx, p: Tensor, batch: int, module: Any, name: str) -> Tensor:
        attach(ctx, module)
        ctx.name = name
        return p.expand(batch, *p.shape[1:])

    @staticmethod
    @first_order_only
    def backward(ctx, g: Tensor):
        ctx.module._dp_engine.on_backward(ctx.module, ctx.name, g, ctx)
        return None, None, None, None

    @staticmethod
    def norms(module: Any, uses) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        for name, gs in _by_name(uses).items():
            p = getattr_raw(module, name)
            if p is not None and p.requires_grad:
                out[id(p)] = raw_norms(gs)
        return out

    @staticmethod
    def clipped_sum(module: Any, uses, specs) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        for name, gs in _by_name(uses).items():
            p = getattr_raw(module, name)
            spec = specs.get(id(p)) if p is not None else None
            if p is not None and spec is not None:
                out[id(p)] = raw_clipped_sum(gs, spec, p.shape)
        return out


def getattr_raw(module: Any, name: str) -> Tensor | None:
    """The parameter itself, bypassing a tapped module's ``__getattr__``."""
    return module._parameters.get(name)


def _by_name(uses) -> dict[str, list[Tensor]]:
    out: dict[str, list[Tensor]] = {}
    for name, g in uses:
        out.setdefault(name, []).append(g)
    return out


def _rows(gs: list[Tensor]) -> Tensor:
    """U per-sample gradients (B, *s) -> (B, U, numel)."""
    rows = [g.reshape(g.shape[0], 1, -1) for g in gs]
    return rows[0] if len(rows) == 1 else torch.cat(rows, 1)


def raw_norms(gs: list[Tensor]) -> Tensor:
    """||sum_u G_ui||^2 per sample, from the per-sample gradients G_u (B, *s) of each use u."""
    return ops.certified.bias_norms(_rows(gs))


def raw_clipped_sum(gs: list[Tensor], spec: Any, shape: torch.Size) -> Tensor:
    """scale * (prev + sum_i c_i sum_u G_ui + noise_std * z), reshaped to ``shape`` (numel = prod(s))."""
    prev = spec.prev.reshape(-1) if spec.prev is not None else None
    out = ops.bias_clipped_sum(_rows(gs), spec.c, noise_std=spec.noise_std, scale=spec.scale, seed=spec.seed, prev=prev)
    return out.reshape(shape)
