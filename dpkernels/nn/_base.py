"""The mixin every DP layer shares: attach to an engine, build from a torch layer."""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from torch import nn

T = TypeVar("T", bound="DPModule")


def make_twin(module: nn.Module, cls: type, *, in_place: bool = False) -> Any:
    """``module`` as an instance of ``cls`` (its DP twin), sharing its parameters, buffers, submodules and
    hooks (tied weights stay tied): a shallow copy whose class is swapped, or with ``in_place`` the
    module itself, so that a reference the caller kept becomes the twin."""
    new = module if in_place else copy.copy(module)
    if not in_place:
        new._parameters = dict(module._parameters)  # type: ignore[attr-defined]
        new._buffers = dict(module._buffers)  # type: ignore[attr-defined]
        new._modules = dict(module._modules)  # type: ignore[attr-defined]
    object.__setattr__(new, "__class__", cls)
    return new


class DPModule(nn.Module):
    """A torch layer with the same forward and state_dict whose backward reports per-sample work.

    Without an engine attached (``_dp_engine is None``) a DP layer behaves exactly like its torch
    base class; `dpkernels.make_private` attaches one.
    """

    _dp_engine: Any = None
    dp_function: Any = None
    dp_norm_method: str = "-"  # how the last backward computed this layer's norms (engine.report)
    torch_layer: type[nn.Module]

    @classmethod
    def from_module(cls: type[T], module: nn.Module, *, in_place: bool = False) -> T:
        """A DP twin of ``module`` sharing its parameters, buffers and hooks (`make_twin`)."""
        if type(module) is not cls.torch_layer and not isinstance(module, cls):
            raise TypeError(
                f"{cls.__name__}.from_module takes a {cls.torch_layer.__name__}, got {type(module).__name__}"
            )
        return make_twin(module, cls, in_place=in_place)

    def _dp_active(self) -> bool:
        """Whether this forward call runs the DP path (and counts a use with the engine)."""
        eng = self._dp_engine
        return eng is not None and eng.wants(self)

    def _dp_training(self) -> bool:
        """Whether an engine is attached and DP training is on, without counting a use (input checks)."""
        eng = self._dp_engine
        return eng is not None and eng.active()

    def _dp_name(self) -> str:
        """The class and, once attached to an engine, the layer's name in the model: for error messages."""
        names = getattr(self._dp_engine, "_name_of", {})
        return f"{type(self).__name__} {names[self]!r}" if self in names else type(self).__name__
