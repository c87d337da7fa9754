"""Conv1d/2d/3d: y = conv(x, W) + b on inputs (B, C_in, *S).

Per-sample norms are the Linear formulas on unfold(x) (see ops.reference.conv): T = output
positions, d = C_in/groups * prod(k), p = C_out/groups, summed over groups; the FLOP rule
(ops.linear_norm_method) picks ghost norm or instantiation per layer. The clipped sum is one
weight-gradient convolution with G's samples scaled by c_i.

The input the Function sees is already padded for padding modes other than "zeros" (the layer
pads outside it, as torch's conv does), so only zero padding is numeric here. Several uses of
one layer: their unfolded rows are concatenated along T (the norm of the summed gradient), and
their clipped sums are chained through ``prev`` with the noise added once, in the last.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import ops
from ._common import attach, first_order_only, trainable

# Elements of unfolded input per chunk when several uses are concatenated (as the reference op).
_CHUNK_ELEMS = 1 << 26


class ConvSaved(NamedTuple):
    """What a conv's forward hands the engine: the (padded) input and the conv's geometry."""

    x: Tensor
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def geometry(self) -> dict[str, Any]:
        return dict(
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )


def _g_rows(g: Tensor) -> Tensor:
    """(B, C_out, *out) -> (B, T, C_out)."""
    return g.flatten(2).transpose(1, 2)


class ConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        module: Any,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        attach(ctx, module)
        ctx.geom = (tuple(weight.shape[2:]), stride, padding, dilation, groups)
        n = x.dim() - 2
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * n, groups)

    @staticmethod
    @first_order_only
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        kernel_size, stride, padding, dilation, groups = ctx.geom
        gx = None
        if ctx.needs_input_grad[0]:  # skipped for a first layer whose input needs no gradient
            n = x.dim() - 2
            gx = torch.ops.aten.convolution_backward(
                g,
                x,
                weight.to(g.dtype),
                None,
                list(stride),
                list(padding),
                list(dilation),
                False,
                [0] * n,
                groups,
                [True, False, False],
            )[0]
        saved = ConvSaved(x, kernel_size, stride, padding, dilation, groups)
        ctx.module._dp_engine.on_backward(ctx.module, saved, g, ctx)
        return gx, None, None, None, None, None, None, None

    @staticmethod
    def _weight_norms_multi(uses, method: str) -> Tensor:
        """sum_j ||sum_u G_uij^T A_uij||^2 for several uses: rows of all uses concatenated along T."""
        s0, g0 = uses[0]
        B, groups = g0.shape[0], s0.groups
        per_sample = sum(math.prod(g.shape[2:]) * s.x.shape[1] * math.prod(s.kernel_size) for s, g in uses)
        step = max(1, _CHUNK_ELEMS // max(1, per_sample))
        out = [torch.empty(0, device=g0.device, dtype=torch.float64)]
        for start in range(0, B, step):
            sl = slice(start, start + step)
            rows = [ops.reference.conv_rows(s.x[sl], g[sl], **s.geometry()) for s, g in uses]
            a = torch.cat([r[0] for r in rows], 1)
            gr = torch.cat([r[1] for r in rows], 1)
            nw, _ = ops.certified.linear_norms(a, gr, bias=False, method=method)
            out.append(nw.view(-1, groups).sum(dim=1))
        return torch.cat(out)

    @staticmethod
    def norms(module: Any, uses) -> dict[int, Tensor]:
        w, b = trainable(module, "weight"), trainable(module, "bias")
        out: dict[int, Tensor] = {}
        if w is not None:
            s0, g0 = uses[0]
            T = sum(math.prod(g.shape[2:]) for _, g in uses)
            d = math.prod(w.shape[1:])
            p = w.shape[0] // s0.groups
            method = ops.linear_norm_method(T, d, p)
            module.dp_norm_method = method
            if len(uses) == 1:
                nw, nb = ops.certified.conv_norms(s0.x, g0, **s0.geometry(), bias=b is not None, method=method)
                out[id(w)] = nw
                if b is not None:
                    assert nb is not None
                    out[id(b)] = nb
                return out
            out[id(w)] = ConvFunction._weight_norms_multi(uses, method)
        else:
            module.dp_norm_method = "bias-only"
        if b is not None:
            gs = [_g_rows(g) for _, g in uses]
            out[id(b)] = ops.certified.bias_norms(gs[0] if len(gs) == 1 else torch.cat(gs, 1))
        return out

    @staticmethod
    def clipped_sum(module: Any, uses, specs) -> dict[int, Tensor]:
        w, b = trainable(module, "weight"), trainable(module, "bias")
        sw = specs.get(id(w)) if w is not None else None
        sb = specs.get(id(b)) if b is not None else None
        out: dict[int, Tensor] = {}
        both = sw is not None and sb is not None and sw.c is sb.c  # one call per use for both (same factors)
        if sw is not None:
            assert w is not None
            rw, rb = sw.prev, sb.prev if (both and sb is not None) else None
            for k, (s, g) in enumerate(uses):
                last = k == len(uses) - 1  # noise and scale once, in the last use
                rw, rb_k = ops.conv_clipped_sum(
                    s.x,
                    g,
                    sw.c,
                    weight_shape=tuple(w.shape),
                    stride=s.stride,
                    padding=s.padding,
                    dilation=s.dilation,
                    groups=s.groups,
                    bias=both,
                    noise_std=sw.noise_std if last else 0.0,
                    scale=sw.scale if last else 1.0,
                    seed_w=sw.seed,
                    seed_b=sb.seed if (both and sb is not None) else 0,
                    prev_w=rw,
                    prev_b=rb,
                )
                if both:
                    rb = rb_k
            assert rw is not None
            out[id(w)] = rw
            if both:
                assert b is not None and rb is not None
                out[id(b)] = rb
                return out
        if sb is not None:
            assert b is not None
            gs = [_g_rows(g) for _, g in uses]
            out[id(b)] = ops.bias_clipped_sum(
                gs[0] if len(gs) == 1 else torch.cat(gs, 1),
                sb.c,
                noise_std=sb.noise_std,
                scale=sb.scale,
                seed=sb.seed,
                prev=sb.prev,
            )
        return out
