"""What every DP autograd Function shares: autocast handling and the per-layer protocol.

A DP Function's backward returns grad_input as usual and ``None`` for the
parameters: it hands (saved input, output gradient) to the engine, which later
calls the Function's two static methods

    norms(module, uses)              -> {id(param): (B,) per-sample squared norms}
    clipped_sum(module, uses, specs) -> {id(param): scale * (prev + sum_i c_i g_i + noise)}

with ``uses`` the list of (saved, G) of every call of the module in this pass
(a layer used twice: the per-sample gradient is the sum over uses).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn


def autocast_inputs(*tensors: Tensor | None) -> tuple[tuple[Tensor | None, ...], AbstractContextManager]:
    """Cast floating inputs to the active autocast dtype (as autocast would for a matmul or conv),
    and return a context that turns autocast off around the Function, so that its forward and
    backward see one dtype. Norms and sums are still accumulated in fp32 by the ops."""
    first = next(t for t in tensors if t is not None)
    dev = first.device.type
    if not torch.is_autocast_enabled(dev):
        return tensors, nullcontext()
    dt = torch.get_autocast_dtype(dev)
    cast = tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors)
    return cast, torch.autocast(dev, enabled=False)


def attach(ctx: Any, module: nn.Module) -> None:
    """Keep on the autograd node of one use of ``module`` the module and the model's batch size at this
    forward: backward checks the use's output gradient against it (another forward, an input-gradient
    probe on a validation batch, may run before this backward)."""
    ctx.module = module
    ctx.model_batch = getattr(module._dp_engine, "batch_size", None)


def trainable(module: nn.Module, name: str) -> nn.Parameter | None:
    """The module's parameter ``name`` if it exists and requires grad."""
    p = getattr(module, name, None)
    return p if isinstance(p, nn.Parameter) and p.requires_grad else None


def batch_rows(x: Tensor) -> Tensor:
    """(B, ..., d) -> (B, T, d) with T the product of the middle dimensions."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])  # not -1: B may be 0
