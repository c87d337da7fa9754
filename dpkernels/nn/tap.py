"""Raw parameters of shape (1, *s) that a model broadcasts over the batch (class tokens, position tables).

`tap_parameters(module, names)` gives ``module`` (in place) a subclass of its own class whose
``__getattr__`` returns each named parameter passed through `functional.tap.TapFunction`, i.e.
expanded to (B, *s) with B the engine's batch size, while the module's forward runs under DP.
Values are unchanged wherever the model broadcasts dim 0 against the batch (``P + x``,
``P.expand(B, ...)``, ``cat([P.expand(B, ...), x])``), and the backward then sees sample i's
gradient G_i directly. Everything else is untouched: ``named_parameters``, ``state_dict``,
``.to()`` and attribute reads outside the module's forward see the parameter itself.

Exactness needs every read of the parameter inside the forward to treat dim 0 as the batch
(a ``P.sum()`` or ``P[0]`` would silently count it B times), so only the classes listed in
`TAPPED_PARAMETERS`, whose forward was read, are tapped automatically; `tap_parameters` lets a
user opt in for a module whose code they have checked.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..functional.tap import TapFunction
from ._base import DPModule

# Qualified class name -> parameters it only ever broadcasts over the batch in forward (code read for
# transformers 5.x and torchvision 0.2x). ViT's mask_token is expanded with .expand(B, N, -1) too.
TAPPED_PARAMETERS: dict[str, tuple[str, ...]] = {
    "transformers.models.vit.modeling_vit.ViTEmbeddings": ("cls_token", "mask_token", "position_embeddings"),
    "torchvision.models.vision_transformer.VisionTransformer": ("class_token",),
    "torchvision.models.vision_transformer.Encoder": ("pos_embedding",),
}

# Forward keyword arguments under which a tapped class reads a parameter in a way that is not a broadcast
# over the batch (refused with this reason while DP is active, instead of a shape error deep inside).
REFUSED_KWARGS: dict[str, dict[str, str]] = {
    "transformers.models.vit.modeling_vit.ViTEmbeddings": {
        "interpolate_pos_encoding": "it reshapes position_embeddings to a batch of 1 to resize it; train at the "
        "model's image_size (interpolate_pos_encoding=False)",
    },
}

_classes: dict[type, type] = {}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _tapped_class(base: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``base`` that taps its parameters (one per base class, cached)."""
    if issubclass(base, DPModule) and getattr(base, "dp_function", None) is TapFunction:
        return base
    if base in _classes:
        return _classes[base]

    def __getattr__(self, name: str) -> Any:
        value = super(cls, self).__getattr__(name)  # type: ignore[arg-type]  # parameters land here
        d = self.__dict__
        if (
            d.get("_dp_tap_depth", 0) > 0
            and name in d.get("_dp_tapped", ())
            and value is not None
            and value.requires_grad
            and self._dp_active()
        ):
            batch = self._dp_engine.batch_size
            if batch is None:
                raise RuntimeError(
                    f"{type(self).__name__}.{name} is broadcast over the batch, but the engine does not know the "
                    f"batch size: call the model with the batch as the first dimension of its first tensor input"
                )
            return TapFunction.apply(value, batch, self, name)
        return value

    refused = REFUSED_KWARGS.get(qualified_name(base), {})

    @functools.wraps(base.forward)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for k, why in refused.items():
            if kwargs.get(k) and self._dp_engine is not None and self._dp_engine.active():
                raise ValueError(f"{base.__name__}({k}=...) cannot give exact per-sample gradients under DP: {why}")
        d = self.__dict__
        d["_dp_tap_depth"] = d.get("_dp_tap_depth", 0) + 1
        try:
            return base.forward(self, *args, **kwargs)
        finally:
            d["_dp_tap_depth"] -= 1

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The class is made at run time: pickle as "re-make the tapped subclass of base", then the state.
        return (_new_tapped, (base,), *object.__reduce_ex__(self, protocol)[2:])

    cls = type(
        f"DP{base.__name__}",
        (DPModule, base),
        {
            "__getattr__": __getattr__,
            "forward": forward,
            "__reduce_ex__": __reduce_ex__,
            "__module__": __name__,
            "__doc__": f"{base.__name__} whose batch-broadcast parameters give exact per-sample gradients.",
            "torch_layer": base,
            "dp_function": TapFunction,
            "dp_norm_method": "direct",
        },
    )
    _classes[base] = cls
    return cls


def _new_tapped(base: type[nn.Module]) -> nn.Module:
    """An empty instance of the tapped subclass of ``base`` (unpickling fills in its state)."""
    cls = _tapped_class(base)
    return cls.__new__(cls)


def tap_parameters(module: nn.Module, names: Iterable[str]) -> nn.Module:
    """Tap ``names`` (parameters of ``module`` of shape (1, *s), broadcast over the batch) in place.

    Per-sample gradient of P: G_i = dL_i / dY_i with Y = P.expand(B, *s). Returns ``module``.
    Only call this for a module whose forward uses each parameter broadcast against the batch.
    """
    names = tuple(names)
    for n in names:
        if n not in module._parameters:
            raise ValueError(f"{type(module).__name__} has no parameter {n!r} to tap")
        p = module._parameters[n]
        if p is not None and (p.dim() == 0 or p.shape[0] != 1):
            raise ValueError(
                f"{type(module).__name__}.{n} has shape {tuple(p.shape)}: only parameters with a leading dimension "
                f"of 1 that the model broadcasts over the batch can be tapped"
            )
    known = module.__dict__.get("_dp_tapped", frozenset()) | frozenset(names)
    others = [n for n, p in module._parameters.items() if p is not None and n not in known]
    if others:
        # The engine treats every direct parameter of a DP module as covered: all must be tapped.
        raise ValueError(
            f"{type(module).__name__} has parameters {others} besides the tapped {sorted(known)}: a tapped module "
            f"must tap all its own parameters (move the others into a submodule)"
        )
    object.__setattr__(module, "__class__", _tapped_class(type(module)))
    module.__dict__["_dp_tapped"] = known
    return module


def tap_known(module: nn.Module) -> bool:
    """Tap ``module``'s parameters if its class is in `TAPPED_PARAMETERS`; whether it was."""
    cls = type(module)
    base = getattr(cls, "torch_layer", cls) if getattr(cls, "dp_function", None) is TapFunction else cls
    names = TAPPED_PARAMETERS.get(qualified_name(base))
    if names is None:
        return False
    present = [n for n in names if module._parameters.get(n) is not None]
    tap_parameters(module, present)
    return True
