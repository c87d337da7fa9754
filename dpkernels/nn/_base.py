"""The mixin every DP layer shares: attach to an engine, build from a torch layer."""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from torch import nn

T = TypeVar("T", bound="DPModule")


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
    def from_module(cls: type[T], module: nn.Module) -> T:
        """A DP twin of ``module`` sharing its parameters, buffers and hooks (tied weights stay tied)."""
        if type(module) is not cls.torch_layer and not isinstance(module, cls):
            raise TypeError(
                f"{cls.__name__}.from_module takes a {cls.torch_layer.__name__}, got {type(module).__name__}"
            )
        new = copy.copy(module)
        new._parameters = dict(module._parameters)  # type: ignore[attr-defined]
        new._buffers = dict(module._buffers)  # type: ignore[attr-defined]
        new._modules = dict(module._modules)  # type: ignore[attr-defined]
        object.__setattr__(new, "__class__", cls)
        return new  # type: ignore[return-value]

    def _dp_active(self) -> bool:
        eng = self._dp_engine
        return eng is not None and eng.wants(self)
