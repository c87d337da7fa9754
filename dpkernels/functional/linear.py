"""Linear: y = x W^T + b on inputs (B, ..., d).

Per-sample norms by ghost norm or instantiation (the FLOP rule picks, see
ops.linear_norm_method); clipped sum sum_i c_i G_i^T A_i. Several uses of one
layer are concatenated along T, which gives the norm of the summed gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ._common import attach, batch_rows, first_order_only, trainable


class LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, module: Any) -> Tensor:
        ctx.save_for_backward(x, weight)
        attach(ctx, module)
        return F.linear(x, weight, bias)

    @staticmethod
    @first_order_only
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        gx = g @ weight.to(g.dtype) if ctx.needs_input_grad[0] else None
        ctx.module._dp_engine.on_backward(ctx.module, x, g, ctx)
        return gx, None, None, None

    @staticmethod
    def _rows(uses) -> tuple[Tensor, Tensor]:
        a = [batch_rows(x) for x, _ in uses]
        g = [batch_rows(g) for _, g in uses]
        return (a[0], g[0]) if len(a) == 1 else (torch.cat(a, 1), torch.cat(g, 1))

    @staticmethod
    def norms(module: Any, uses) -> dict[int, Tensor]:
        a, g = LinearFunction._rows(uses)
        w, b = trainable(module, "weight"), trainable(module, "bias")
        out: dict[int, Tensor] = {}
        if w is not None:
            method = ops.linear_norm_method(a.shape[1], a.shape[2], g.shape[2])
            module.dp_norm_method = method
            nw, nb = ops.certified.linear_norms(a, g, bias=b is not None, method=method)
            out[id(w)] = nw
        else:
            module.dp_norm_method = "bias-only"
            nb = ops.certified.bias_norms(g)
        if b is not None:
            assert nb is not None
            out[id(b)] = nb
        return out

    @staticmethod
    def clipped_sum(module: Any, uses, specs) -> dict[int, Tensor]:
        a, g = LinearFunction._rows(uses)
        return fused_linear_sum(a, g, trainable(module, "weight"), trainable(module, "bias"), specs)


def fused_linear_sum(a: Tensor, g: Tensor, w: Tensor | None, b: Tensor | None, specs) -> dict[int, Tensor]:
    """{id(p): scale * (prev + sum_i c_i grad_i p + noise_std * z)} for the weight w (grad G_i^T A_i) and
    bias b (grad sum_t g_it) a spec asks for: one fused op for both when they share clip factors."""
    sw = specs.get(id(w)) if w is not None else None
    sb = specs.get(id(b)) if b is not None else None
    out: dict[int, Tensor] = {}
    if sw is not None and sb is not None and sw.c is sb.c:  # one call for both (same clip factors)
        rw, rb = ops.linear_clipped_sum(
            a,
            g,
            sw.c,
            bias=True,
            noise_std=sw.noise_std,
            scale=sw.scale,
            seed_w=sw.seed,
            seed_b=sb.seed,
            prev_w=sw.prev,
            prev_b=sb.prev,
        )
        assert rb is not None
        return {id(w): rw, id(b): rb}
    if sw is not None:
        out[id(w)], _ = ops.linear_clipped_sum(
            a, g, sw.c, bias=False, noise_std=sw.noise_std, scale=sw.scale, seed_w=sw.seed, prev_w=sw.prev
        )
    if sb is not None:
        out[id(b)] = ops.bias_clipped_sum(g, sb.c, noise_std=sb.noise_std, scale=sb.scale, seed=sb.seed, prev=sb.prev)
    return out
