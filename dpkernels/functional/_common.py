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

import functools
import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch._C import _functions


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
    """Keep on the autograd node of one use of ``module`` the module, the model's batch size at this
    forward (backward checks the use's output gradient against it: another forward, an input-gradient
    probe on a validation batch, may run before this backward) and the 16-bit autocast dtype it ran
    under (`autocast16`: a mean loss through it is refused, see `Engine.refuse_16bit_mean`)."""
    ctx.module = module
    ctx.model_batch = getattr(module._dp_engine, "batch_size", None)
    ctx.autocast16 = autocast16(module)


def autocast16(module: nn.Module) -> torch.dtype | None:
    """The 16-bit dtype autocast is on with for ``module``'s device now, or None. A Function that turns
    autocast off around itself (`autocast_inputs`) returns 16-bit outputs then, and so gets 16-bit output
    gradients; the others (Embedding, norm layers on CUDA, taps) may return float32 while the 16-bit
    operations after them round their output gradients."""
    dev = "cpu"
    for p in module._parameters.values():
        if p is not None:
            dev = p.device.type
            break
    if not torch.amp.is_autocast_available(dev) or not torch.is_autocast_enabled(dev):
        return None
    dt = torch.get_autocast_dtype(dev)
    return dt if dt in (torch.bfloat16, torch.float16) else None


def trainable(module: nn.Module, name: str) -> nn.Parameter | None:
    """The module's parameter ``name`` if it exists and requires grad."""
    p = getattr(module, name, None)
    return p if isinstance(p, nn.Parameter) and p.requires_grad else None


def batch_rows(x: Tensor) -> Tensor:
    """(B, ..., d) -> (B, T, d) with T the product of the middle dimensions."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])  # not -1: B may be 0


def first_order_only(backward: Any) -> Any:
    """torch's ``once_differentiable`` for a DP Function's backward, with an error that names the layer and
    what to do when its gradient is differentiated again (create_graph=True, as a gradient penalty does):
    a DP layer gives per-sample first-order gradients only, and the gradient of a penalty with respect to
    its parameters would have no per-sample norm."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *args: Any) -> Any:
        with torch.no_grad():
            outputs = backward(ctx, *args)
        if not torch.is_grad_enabled() or not any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return outputs
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        module: Any = getattr(ctx, "module", None)
        name = module._dp_name() if hasattr(module, "_dp_name") else type(module).__name__
        err = _functions.DelayedError(
            f"DP layer {name} was differentiated twice (a backward with create_graph=True, e.g. a gradient penalty, "
            f"then a backward through that gradient): DP layers compute first-order per-sample gradients only, and "
            f"the penalty's gradient with respect to their parameters would be neither clipped nor noised. Drop the "
            f"penalty, or compute it through layers that are not private (a non-DP copy of the model)".encode(),
            len(outs),
        )
        return err(*[None if v is None else v.detach().requires_grad_() for v in outs])  # type: ignore[arg-type]

    return wrapper
