"""LayerNorm, RMSNorm, GroupNorm: y = xhat * w + b with xhat the normalised input.

The affine parameters' per-sample gradients are cheap to form directly, (B, C) each
(ops.affine_norms / ops.affine_clipped_sum):

    gw_i = sum_t xhat_it * g_it,        gb_i = sum_t g_it

with rows (B, T, C): C = prod(normalized_shape) and T every position before it (LayerNorm, RMSNorm);
C the channels and T the spatial positions (GroupNorm, any spatial rank). Several uses of one layer
are concatenated along T (the per-sample gradient is the sum over uses).

Forward is torch's own op, run under the caller's autocast state (so the output dtype is torch's:
fp32 under CUDA autocast, the input's dtype under CPU autocast). Backward recomputes that op under the
same autocast state and differentiates it for grad_input, so grad_input is torch's exactly; xhat for
the engine is recomputed once in backward from the saved input the same way, with the weight and bias
left out, and kept with the use for both the norms and the clipped sum.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ._common import attach, first_order_only, trainable

AutocastState = tuple[str, bool, torch.dtype]


def autocast_state(x: Tensor) -> AutocastState:
    """(device type, enabled, dtype) of autocast for ``x``'s device at this moment."""
    dev = x.device.type
    if not torch.amp.is_autocast_available(dev):
        return dev, False, x.dtype
    return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)


def replay(state: AutocastState) -> AbstractContextManager:
    """A context with the autocast state recorded in forward (backward and the engine run outside it)."""
    dev, enabled, dtype = state
    if not torch.amp.is_autocast_available(dev):
        return nullcontext()
    return torch.autocast(dev, dtype=dtype, enabled=enabled)


def cat_rows(parts: list[Tensor]) -> Tensor:
    """Concatenate (B, T_k, C) along T, promoting dtypes."""
    if len(parts) == 1:
        return parts[0]
    dt = parts[0].dtype
    for p in parts[1:]:
        dt = torch.promote_types(dt, p.dtype)
    return torch.cat([p.to(dt) for p in parts], 1)


def _flat(t: Tensor | None) -> Tensor | None:
    """A parameter-shaped tensor (normalized_shape) as the ops' (C,)."""
    return None if t is None else t.reshape(-1)


class _AffineNormFunction(torch.autograd.Function):
    """Shared forward/backward/norms/clipped_sum; subclasses give the torch op and the row layout."""

    @staticmethod
    def op(module: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def to_rows(module: Any, t: Tensor) -> Tensor:
        """A tensor shaped like the input -> (B, T, C)."""
        raise NotImplementedError

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, module: Any) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        attach(ctx, module)
        ctx.autocast = autocast_state(x)
        return type(module).dp_function.op(module, x, weight, bias)

    @staticmethod
    @first_order_only
    def backward(ctx, g: Tensor):
        x, weight, bias = ctx.saved_tensors
        module = ctx.module
        gx = None
        if ctx.needs_input_grad[0]:
            w = weight.detach() if weight is not None else None
            b = bias.detach() if bias is not None else None
            with torch.enable_grad(), replay(ctx.autocast):
                xr = x.detach().requires_grad_()
                y = type(module).dp_function.op(module, xr, w, b)
            (gx,) = torch.autograd.grad(y, xr, g)
        xhat = None
        if trainable(module, "weight") is not None:
            # xhat once per backward, kept with the use: the norms and the clipped sum both read it
            # (recomputing it in each normalised the input twice more per step)
            with torch.no_grad(), replay(ctx.autocast):
                xhat = type(module).dp_function.op(module, x, None, None)
        module._dp_engine.on_backward(module, (x, ctx.autocast, xhat), g, ctx)
        return gx, None, None, None

    @classmethod
    def rows(cls, module: Any, uses, xhat: bool = True) -> tuple[Tensor | None, Tensor]:
        """(xhat, g) of all uses as (B, T, C), concatenated along T; xhat as backward formed it (or from the
        saved input where it did not)."""
        xs: list[Tensor] = []
        gs: list[Tensor] = []
        for saved, g in uses:
            x, state, xh = saved if len(saved) == 3 else (*saved, None)  # (x, state): the functional API's uses
            gs.append(cls.to_rows(module, g))
            if xhat:
                if xh is None:
                    with torch.no_grad(), replay(state):
                        xh = cls.op(module, x, None, None)
                xs.append(cls.to_rows(module, xh))
        return (cat_rows(xs) if xhat else None), cat_rows(gs)

    @classmethod
    def norms(cls, module: Any, uses) -> dict[int, Tensor]:
        w, b = trainable(module, "weight"), trainable(module, "bias")
        if not uses or (w is None and b is None):
            return {}
        xh, g = cls.rows(module, uses, xhat=w is not None)
        module.dp_norm_method = "direct"
        nw, nb = ops.certified.affine_norms(g if xh is None else xh, g, weight=w is not None, bias=b is not None)
        out: dict[int, Tensor] = {}
        if w is not None:
            assert nw is not None
            out[id(w)] = nw
        if b is not None:
            assert nb is not None
            out[id(b)] = nb
        return out

    @classmethod
    def clipped_sum(cls, module: Any, uses, specs) -> dict[int, Tensor]:
        w, b = trainable(module, "weight"), trainable(module, "bias")
        sw = specs.get(id(w)) if w is not None else None
        sb = specs.get(id(b)) if b is not None else None
        if not uses or (sw is None and sb is None):
            return {}
        xh, g = cls.rows(module, uses, xhat=sw is not None)
        x_or_g = g if xh is None else xh
        out: dict[int, Tensor] = {}
        if sw is not None and sb is not None and sw.c is sb.c:  # one call for both (same clip factors)
            rw, rb = ops.affine_clipped_sum(
                x_or_g,
                g,
                sw.c,
                weight=True,
                bias=True,
                noise_std=sw.noise_std,
                scale=sw.scale,
                seed_w=sw.seed,
                seed_b=sb.seed,
                prev_w=_flat(sw.prev),
                prev_b=_flat(sb.prev),
            )
            assert rw is not None and rb is not None and w is not None and b is not None
            return {id(w): rw.view(w.shape), id(b): rb.view(b.shape)}
        for p, s, is_w in ((w, sw, True), (b, sb, False)):
            if p is None or s is None:
                continue
            rw, rb = ops.affine_clipped_sum(
                x_or_g,
                g,
                s.c,
                weight=is_w,
                bias=not is_w,
                noise_std=s.noise_std,
                scale=s.scale,
                seed_w=s.seed,
                seed_b=s.seed,
                prev_w=_flat(s.prev) if is_w else None,
                prev_b=None if is_w else _flat(s.prev),
            )
            r = rw if is_w else rb
            assert r is not None
            out[id(p)] = r.view(p.shape)  # (C,) -> normalized_shape
        return out


def _last_dims_rows(t: Tensor, normalized_shape: tuple[int, ...]) -> Tensor:
    k = len(normalized_shape)
    C = math.prod(normalized_shape)
    return t.reshape(t.shape[0], math.prod(t.shape[1 : t.dim() - k]), C)


class LayerNormFunction(_AffineNormFunction):
    @staticmethod
    def op(module: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)

    @staticmethod
    def to_rows(module: Any, t: Tensor) -> Tensor:
        return _last_dims_rows(t, tuple(module.normalized_shape))


class RMSNormFunction(_AffineNormFunction):
    @staticmethod
    def op(module: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.rms_norm(x, list(module.normalized_shape), weight, module.eps)

    @staticmethod
    def to_rows(module: Any, t: Tensor) -> Tensor:
        return _last_dims_rows(t, tuple(module.normalized_shape))


class GroupNormFunction(_AffineNormFunction):
    @staticmethod
    def op(module: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.group_norm(x, module.num_groups, weight, bias, module.eps)

    @staticmethod
    def to_rows(module: Any, t: Tensor) -> Tensor:
        B, C = t.shape[0], t.shape[1]
        return t.reshape(B, C, math.prod(t.shape[2:])).transpose(1, 2)
