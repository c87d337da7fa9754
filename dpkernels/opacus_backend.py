"""dpkernels as the per-sample norm backend of Opacus's ghost clipping.

Opacus (>= 1.5) computes per-sample gradient norms in ``grad_sample_mode="ghost"`` (fast gradient
clipping) with a *norm sampler* per layer type, registered in
``GradSampleHooksFastGradientClipping.NORM_SAMPLERS`` (``opacus.grad_sample.register_norm_sampler``).
Opacus 1.6 ships norm samplers for nn.Linear and nn.Embedding only; every other layer gets its
per-sample gradients *instantiated* (B x the parameter's size) and their norms taken.

`enable()` registers dpkernels' norms (`dpkernels.api.per_sample_norms`) for nn.Linear,
nn.Conv1d/2d/3d, nn.Embedding, nn.LayerNorm, nn.RMSNorm and nn.GroupNorm, so convolutions use the
ghost norm / instantiation FLOP rule on unfold(x) and the norm layers their direct (B, C) form,
with no per-sample gradient in memory; Linear's norm also covers inputs of any rank (Opacus's own
handles 2-d and 3-d only) and Embedding's excludes ``padding_idx``, whose row torch never updates.
Everything else in Opacus is unchanged: its second backward, clipping, noise and accounting.

    import dpkernels.opacus_backend as dpk_opacus
    dpk_opacus.enable()            # or:  with dpk_opacus.enable(): ...
    model, optimizer, criterion, loader = PrivacyEngine().make_private(..., grad_sample_mode="ghost")
    dpk_opacus.disable()           # the registry as it was before enable()

Convention (Opacus's): a norm sampler gets ``(layer, activations, backprops)`` -- the list of the
layer's forward inputs and the output gradient, already multiplied by the batch size for a mean
loss -- and returns ``{param: (B,) NOT squared per-sample norm}`` for each trainable parameter.
The norms are float32 for half-precision inputs (Opacus would return them in the half type; a
rounded-down norm would loosen clipping) and the input's dtype otherwise.

Limits that come from Opacus's design: a layer registered here that is called twice in one forward
(a shared Conv, say) makes Opacus's ghost mode raise "Parameter tying is not supported with Ghost
Clipping", where without `enable()` Opacus would instantiate its per-sample gradients; `disable()`
or ``enable(layers=...)`` without that type restores Opacus's behaviour.

Importing this module does not import Opacus; `enable()` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from . import api

__all__ = ["DEFAULT_LAYERS", "disable", "enable", "is_enabled", "norm_sampler"]

DEFAULT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
)

_MISSING = object()
# What the registry held for each type before enable(); None while disabled.
_saved: dict[type[nn.Module], Any] | None = None


def norm_sampler(layer: nn.Module, activations: Sequence[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Opacus's norm-sampler signature: {param: (B,) per-sample gradient norm ||grad_i param||_2 (not squared)}.

    The squared norms come from `dpkernels.api.per_sample_norms`; rounding can leave a ghost norm a few ulps
    below zero, hence the clamp before the square root (Opacus's own samplers do the same).
    """
    sq = api.per_sample_norms(layer, activations, backprops)
    return {p: n.clamp_min(0).sqrt() for p, n in sq.items()}


def _registry() -> dict:
    try:
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
            GradSampleHooksFastGradientClipping,
        )
    except ImportError as exc:
        raise ImportError(
            "dpkernels.opacus_backend needs Opacus >= 1.5 (its ghost-clipping norm-sampler registry): "
            "pip install 'opacus>=1.5'"
        ) from exc
    return GradSampleHooksFastGradientClipping.NORM_SAMPLERS


class _Enabled:
    """What `enable()` returns: usable as a context manager that disables on exit."""

    def __enter__(self) -> _Enabled:
        return self

    def __exit__(self, *exc: object) -> None:
        disable()


def enable(layers: Iterable[type[nn.Module]] = DEFAULT_LAYERS) -> _Enabled:
    """Register dpkernels' norm sampler in Opacus's ghost-clipping registry for ``layers`` (exact types).

    Saves what the registry held for each type first, for `disable()`. Calling it again while enabled
    raises (disable first), so the saved state is always Opacus's own. Returns a handle that, used as
    ``with enable(): ...``, disables on exit.
    """
    global _saved
    types = tuple(layers)
    bad = [t for t in types if not api.supported(t)]
    if bad:
        names = ", ".join(getattr(t, "__name__", repr(t)) for t in bad)
        raise TypeError(f"dpkernels has no per-sample norms for {names}; enable() takes layer types among {_names()}")
    registry = _registry()
    if _saved is not None:
        raise RuntimeError("dpkernels.opacus_backend is already enabled; call disable() before enabling again")
    _saved = {t: registry.get(t, _MISSING) for t in types}
    for t in types:
        registry[t] = norm_sampler
    return _Enabled()


def disable() -> None:
    """Restore Opacus's registry as it was before `enable()`: entries put back, added ones removed.

    An entry someone re-registered after `enable()` (no longer dpkernels' sampler) is left as they set it.
    Does nothing when not enabled."""
    global _saved
    if _saved is None:
        return
    registry = _registry()
    for t, old in _saved.items():
        if registry.get(t) is not norm_sampler:
            continue
        if old is _MISSING:
            registry.pop(t, None)
        else:
            registry[t] = old
    _saved = None


def is_enabled() -> bool:
    return _saved is not None


def _names() -> str:
    return ", ".join(t.__name__ for t in DEFAULT_LAYERS)
