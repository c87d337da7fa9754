"""A functional API over dpkernels' per-layer work, for other DP libraries and custom training loops.

Two functions take a layer, its input and its output gradient, batch first, as a backward hook
sees them, and need no engine, no DP layer and no `make_private`:

    per_sample_norms(module, activations, grad_output)          -> {param: (B,) ||grad_i param||^2}
    clipped_sum(module, activations, grad_output, clip_factors)  -> {param: scale * (sum_i c_i grad_i param
                                                                                    + noise_std * z)}

for every trainable parameter of ``module`` (``requires_grad``; frozen ones are left out). Supported
layers: nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, their DP
twins (DPLinear, ...), and Hugging Face's GPT-2 Conv1D and LlamaRMSNorm when transformers is
installed. Per-sample gradients are never formed; the formulas are those of the layers' autograd
Functions (dpkernels.functional), whose ``norms`` and ``clipped_sum`` these functions call:

    Linear   y = x W^T + b, a_i = x_i as (T, d), g_i = dL/dy_i as (T, p), T every middle dimension:
             ||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T> (ghost norm) or sum (G_i^T A_i)^2 (instantiation),
             whichever costs fewer FLOPs (ops.linear_norm_method); bias ||sum_t g_it||^2;
             clipped sum sum_i c_i G_i^T A_i and sum_i c_i sum_t g_it.
    Conv     the Linear formulas on unfold(x) (T = output positions, d = C_in/groups * prod(k),
             p = C_out/groups), summed over groups; non-zero padding modes are applied first.
    Embedding  sum_v ||sum_{t: x_it = v} g_it||^2 (repeated tokens exact, padding_idx excluded);
             clipped sum an index_add, its noise dense over the whole table.
    LayerNorm / RMSNorm / GroupNorm   weight sum_t xhat_it * g_it, bias sum_t g_it, formed directly
             (xhat the normalised input, recomputed from the input).

``grad_output`` is the gradient of the loss with respect to the layer's output. With a mean-reduced
loss it carries a 1/B factor; multiply it by B first if per-sample norms of the per-sample losses are
wanted (Opacus's hooks do this; see dpkernels.opacus_backend).

Backends: ``backend=`` picks the ops' backend ("reference", "triton", "cuda"; None keeps the current
choice, see `dpkernels.set_backend`) for this call; ops a backend lacks run on the reference. The
choice holds for this call only (`dpkernels.ops.use_backend`): other threads keep their own.
"""

from __future__ import annotations

import importlib
import math
import secrets
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from . import ops
from .convert import THIRD_PARTY_LAYERS
from .engine import SumSpec, _mix64
from .functional.conv import ConvFunction, ConvSaved
from .functional.embedding import EmbeddingFunction, unsupported_reason
from .functional.linear import LinearFunction
from .functional.norm import _AffineNormFunction
from .nn import DP_LAYERS, DPModule
from .nn.conv import _DPConvNd

__all__ = ["clipped_sum", "function_of", "per_sample_norms", "supported"]

_SUPPORTED = (
    "nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm (or their DP twins), "
    "transformers' Conv1D and LlamaRMSNorm"
)
_FUNCTIONS = (LinearFunction, ConvFunction, EmbeddingFunction, _AffineNormFunction)


def dp_class_of_type(layer_type: type) -> type[DPModule] | None:
    """The DP twin of a torch (or third-party) layer type, as make_private's convert.dp_class picks it."""
    cls = DP_LAYERS.get(layer_type)
    if cls is None:
        target = THIRD_PARTY_LAYERS.get(f"{layer_type.__module__}.{layer_type.__qualname__}")
        if target is not None:
            mod, attr = target.split(":")
            cls = getattr(importlib.import_module(mod), attr)
    return cls


def function_of(layer_type: type) -> Any:
    """The autograd Function class whose ``norms``/``clipped_sum`` serve layers of exactly this type, or None."""
    if not isinstance(layer_type, type) or not issubclass(layer_type, nn.Module):
        return None
    cls: Any = layer_type if issubclass(layer_type, DPModule) else dp_class_of_type(layer_type)
    fn = getattr(cls, "dp_function", None) if cls is not None else None
    if fn is None or not issubclass(fn, _FUNCTIONS):
        return None
    return fn


def supported(module_or_type: nn.Module | type) -> bool:
    """Whether `per_sample_norms` and `clipped_sum` accept this module (or modules of this exact type)."""
    t = module_or_type if isinstance(module_or_type, type) else type(module_or_type)
    return function_of(t) is not None


class _View:
    """Reads through to the module; keeps what the Functions record (``dp_norm_method``) off the caller's module."""

    def __init__(self, module: nn.Module):
        object.__setattr__(self, "_module", module)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_module"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__[name] = value


def _first(activations: Tensor | Sequence[Tensor], what: str) -> Tensor:
    if isinstance(activations, Tensor):
        return activations
    if isinstance(activations, (list, tuple)) and activations and isinstance(activations[0], Tensor):
        return activations[0]
    raise TypeError(
        f"{what}: activations must be the layer's input tensor or the list of its forward inputs (the first is "
        f"used), got {type(activations).__name__}"
    )


def _shape_error(module: nn.Module, a: Tensor, g: Tensor, expect: str) -> ValueError:
    return ValueError(
        f"{type(module).__name__}: activations {tuple(a.shape)} and grad_output {tuple(g.shape)} do not fit this "
        f"layer; {expect}. Pass the layer's input and the gradient of its output, batch first"
    )


def _uses(module: nn.Module, fn: Any, activations: Tensor | Sequence[Tensor], g: Tensor) -> list[tuple[Any, Tensor]]:
    """The one use (saved, G) the Function's static methods expect, after checking the shapes."""
    name = type(module).__name__
    a = _first(activations, name)
    if g.dim() == 0 or a.dim() == 0 or a.shape[0] != g.shape[0]:
        raise _shape_error(module, a, g, "both need the same batch size as their first dimension")
    if issubclass(fn, LinearFunction):
        w: Tensor = module.weight  # type: ignore[assignment]
        # nn.Linear's weight is (out, in); transformers' Conv1D's is (in, out).
        d_in, d_out = (w.shape[1], w.shape[0]) if isinstance(module, nn.Linear) else (w.shape[0], w.shape[1])
        if a.dim() < 2 or a.shape[:-1] != g.shape[:-1] or a.shape[-1] != d_in or g.shape[-1] != d_out:
            raise _shape_error(module, a, g, f"expected (B, ..., {d_in}) and (B, ..., {d_out})")
        return [(a, g)]
    if fn is ConvFunction:
        n = len(module.kernel_size)  # type: ignore[arg-type]
        if a.dim() != n + 2 or g.dim() != n + 2:
            raise _shape_error(module, a, g, f"a {n}-d convolution needs (B, C, {n} spatial dims) for both")
        x, padding = _DPConvNd._dp_pad(module, a)  # type: ignore[arg-type]
        saved = ConvSaved(
            x,
            tuple(module.kernel_size),  # type: ignore[arg-type]
            tuple(module.stride),  # type: ignore[arg-type]
            padding,
            tuple(module.dilation),  # type: ignore[arg-type]
            int(module.groups),  # type: ignore[arg-type]
        )
        return [(saved, g)]
    if fn is EmbeddingFunction:
        reason = unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"{name}: {reason}")
        D = module.embedding_dim
        if a.is_floating_point() or g.shape[:-1] != a.shape or g.shape[-1] != D:
            raise _shape_error(module, a, g, f"expected integer ids (B, ...) and (B, ..., {D})")
        return [(a, g)]
    # Affine norms: the Function recomputes xhat from the input, without autocast (as the layer's dtype gives).
    if a.shape != g.shape:
        raise _shape_error(module, a, g, "a normalisation layer's output has its input's shape")
    return [((a, (a.device.type, False, a.dtype)), g)]


def _prepare(module: nn.Module, activations: Tensor | Sequence[Tensor], grad_output: Tensor):
    fn = function_of(type(module))
    if fn is None:
        raise TypeError(f"{type(module).__name__} is not supported by dpkernels.api; supported: {_SUPPORTED}")
    params = [p for p in module.parameters(recurse=False) if p.requires_grad]
    return fn, params, _uses(module, fn, activations, grad_output)


def per_sample_norms(
    module: nn.Module,
    activations: Tensor | Sequence[Tensor],
    grad_output: Tensor,
    *,
    backend: str | None = None,
) -> dict[nn.Parameter, Tensor]:
    """Per-sample squared gradient norms of ``module``'s trainable parameters: {p: (B,) ||grad_i p||^2}.

    activations: the layer's input, batch first (a tensor, or the list of forward inputs a hook sees;
    the first is used). grad_output: dL/d(output), the output's shape. See the module docstring for
    each layer's formula. The norms are float64 certified upper bounds on the exact squared norms of the
    given tensors' per-sample gradients (dpkernels.ops.certified), what the engine clips by. The gradient of sample i
    is that of the loss through grad_output[i]; sum the squared norms over parameters (and layers) for
    the norm of a clipping group.
    """
    fn, params, uses = _prepare(module, activations, grad_output)
    if not params:
        return {}
    if grad_output.shape[0] == 0:  # an empty (Poisson) batch: no per-sample work, as in the engine
        return {p: grad_output.new_zeros(0, dtype=ops.acc_dtype(grad_output)) for p in params}
    with ops.use_backend(backend):
        out = fn.norms(_View(module), uses)
    return {p: out[id(p)] for p in _covered(module, params, out)}


def clipped_sum(
    module: nn.Module,
    activations: Tensor | Sequence[Tensor],
    grad_output: Tensor,
    clip_factors: Tensor,
    *,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed: int | None = None,
    backend: str | None = None,
) -> dict[nn.Parameter, Tensor]:
    """Clipped, summed and noised gradients of ``module``'s trainable parameters, shaped like each parameter:

        out[p] = scale * (sum_i c_i grad_i p + noise_std * z_p),   z_p ~ N(0, I)

    c = clip_factors, shape (B,) (e.g. min(1, R / ||grad_i||)). z_p is drawn from a generator keyed by
    the parameter's own seed, splitmix64(seed, k) with k its position among the module's trainable
    parameters (module.parameters(recurse=False) order), so the weight's and bias's noise are
    independent and a call with a given seed is reproducible. ``seed`` None (the default) draws a fresh
    one from the operating system for each call: a seed reused across steps repeats their noise, which
    subtracting two updates then removes. The noise is dense: every coordinate of p gets it
    (embedding rows no sample used included). DP-SGD's usual call: noise_std = sigma * R,
    scale = 1 / expected batch size. Accumulates in float32 (float64 for float64 inputs).

    A sample with c_i = 0 adds exactly 0, even when its activations or output gradients hold inf or NaN
    (the ops select, never 0 * inf = NaN): set c_i = 0 where a per-sample norm is not finite
    (torch.where(torch.isfinite(n2), c, 0)) to leave such a sample out of the sum, as if absent, with no
    host read.
    """
    fn, params, uses = _prepare(module, activations, grad_output)
    B = uses[0][1].shape[0]
    if clip_factors.shape != (B,):
        raise ValueError(
            f"{type(module).__name__}: clip_factors must have shape ({B},), one factor per sample of the batch, "
            f"got {tuple(clip_factors.shape)}"
        )
    if not params:
        return {}
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
    if seed is None:
        seed = secrets.randbits(63)
    specs = {
        id(p): SumSpec(c=clip_factors, noise_std=float(noise_std), scale=float(scale), seed=_mix64(seed, k))
        for k, p in enumerate(params)
    }
    with ops.use_backend(backend):
        if B == 0:  # an empty (Poisson) batch: the sum is empty, the result noise only
            dt = ops.acc_dtype(grad_output)
            return {
                p: ops.add_noise(
                    None, p.shape, noise_std=s.noise_std, scale=s.scale, seed=s.seed, device=p.device, dtype=dt
                )
                for p, s in zip(params, specs.values(), strict=True)
            }
        out = fn.clipped_sum(_View(module), uses, specs)
    return {p: out[id(p)].view(p.shape) for p in _covered(module, params, out)}


def _covered(module: nn.Module, params: list[nn.Parameter], out: dict[int, Tensor]) -> list[nn.Parameter]:
    """``params``, after checking the layer's Function computed each: a parameter the layer type does not have
    (one registered on the module by hand) would otherwise be silently missing or a bare KeyError."""
    names = {id(p): n for n, p in module.named_parameters(recurse=False)}
    extra = [names[id(p)] for p in params if id(p) not in out]
    if extra:
        raise ValueError(
            f"{type(module).__name__} has trainable parameter(s) {extra} that a {type(module).__name__} does not "
            f"have (registered by hand?): dpkernels.api computes the gradients of the layer's own parameters "
            f"only. Freeze them, or compute their per-sample gradients yourself"
        )
    return params
