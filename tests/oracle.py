"""The one naive per-sample oracle of the test suite.

Per-sample gradients by the definition: for each sample i, the gradient of its own loss l_i with
respect to every trainable parameter, from torch's autograd on a batch of one, independently of
anything dpkernels computes. Tests run it on unconverted float64 copies of their models, so what it
returns is the exact per-sample gradient up to float64 rounding. The clipped update is built from it
here too, with the clip functions written out again rather than imported from dpkernels.clipping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

ABADI_EPS = 1e-6


def _rows(batch: Any, i: int) -> Any:
    """Sample i of a batch (a tensor, or a tuple/list/dict of tensors batched along dimension 0)."""
    if isinstance(batch, Tensor):
        return batch[i : i + 1]
    if isinstance(batch, Mapping):
        return {k: _rows(v, i) for k, v in batch.items()}
    return type(batch)(_rows(v, i) for v in batch)


def _size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return _size(next(iter(batch.values())))
    return _size(batch[0])


def per_sample_grads(model: nn.Module, loss: Callable[[nn.Module, Any], Tensor], batch: Any) -> dict[str, Tensor]:
    """{name: (B, *param.shape)}: d l_i / d theta for every trainable parameter, one sample at a time.

    ``loss(model, sample)`` returns sample i's loss for ``sample`` = its rows of ``batch`` (a batch of
    one; any shape, summed). A parameter the sample does not reach gets zeros. Tied parameters appear
    once per name, as named_parameters lists them (their gradient is the sum over uses).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    B = _size(batch)
    out: dict[str, list[Tensor]] = {n: [] for n in params}
    for i in range(B):
        li = loss(model, _rows(batch, i)).sum()
        grads = torch.autograd.grad(li, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads, strict=True):
            out[n].append(torch.zeros_like(p) if g is None else g.detach())
    return {n: torch.stack(v) if v else params[n].new_zeros(0, *params[n].shape) for n, v in out.items()}


def sq_norms(grads: Mapping[str, Tensor], names: Sequence[str] | None = None) -> Tensor:
    """(B,) squared norms of the per-sample gradients over ``names`` (all of them by default)."""
    names = list(grads) if names is None else names
    return sum(grads[n].flatten(1).square().sum(1) for n in names)  # type: ignore[return-value]


def clip(norms: Tensor, R: float, clipping: str = "abadi", gamma: float = 0.01) -> Tensor:
    """abadi: min(1, R / (n + 1e-6)); automatic (AUTO-S): R / (n + gamma)."""
    if clipping == "abadi":
        return (R / (norms + ABADI_EPS)).clamp(max=1.0)
    if clipping == "automatic":
        return R / (norms + gamma)
    raise ValueError(clipping)


def clipped_update(
    grads: Mapping[str, Tensor],
    groups: Sequence[Sequence[str]],
    bounds: Sequence[float],
    divisor: float = 1.0,
    clipping: str = "abadi",
    gamma: float = 0.01,
) -> dict[str, Tensor]:
    """sum_i c_{i,g} grad_i / divisor per parameter, each group clipped at its own bound."""
    out = {}
    for names, R in zip(groups, bounds, strict=True):
        c = clip(sq_norms(grads, names).sqrt(), R, clipping, gamma)
        for n in names:
            out[n] = torch.einsum("b,b...->...", c.to(grads[n].dtype), grads[n]) / divisor
    return out
