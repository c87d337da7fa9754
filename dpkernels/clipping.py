"""Clip functions and clipping groups.

A clipping group is a set of parameters whose per-sample gradients are clipped
together: with n_i the per-sample norm over the group and R_g its bound,

    abadi:      c_i = min(1, R_g / (n_i + 1e-6))
    automatic:  c_i = R_g / (n_i + gamma)          (AUTO-S, Bu et al. 2022)

and every parameter of the group receives sum_i c_i grad_i. Both keep
||c_i grad_i|| <= R_g, so one sample moves the whole update by at most
R_total = sqrt(sum_g R_g^2).

Perturbed clipping (make_private(..., perturb_k=k), Chen, Wu & Hong 2020; dpkernels.perturb) clips
v_i = g_i + k zeta_i, zeta_i ~ N(0, I) over the group's parameters, by the same functions: c_i from a
certified upper bound on ||v_i||, and every parameter receives sum_i c_i v_i, the same zeta_i in the
norm and in the sum. ||c_i v_i|| <= R_g holds for every zeta_i, so the sensitivity is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

CLIP_FUNCTIONS = ("abadi", "automatic")
GROUP_MODES = ("all-layer", "layer-wise", "param-wise")
ABADI_EPS = 1e-6


def clip_factors(norms: Tensor, bound: float, clipping: str = "abadi", gamma: float = 0.01) -> Tensor:
    """Per-sample clip factors c_i from per-sample norms n_i (not squared), with c_i n_i <= R.

    The engine passes certified norms (upper bounds on the exact ones, dpkernels.ops.certified), so
    c_i ||g_i|| <= c_i n_i <= R, and that holds for n_i the float64 square root of a squared norm too.
    Computed in float64 (float32 rounding of R / (n + eps) could exceed R
    by an ulp), returned in float64 for float64 norms and float32 otherwise, rounded down; a factor
    below the smallest normal float64 is 0 (its rounding is absolute, not relative). A factor is
    never NaN or negative: a NaN norm gives 0 (the engine then either refuses the pass, naming the layer,
    or with nonfinite="drop" sets c_i = 0 for any non-finite norm, +inf too; the clipped sums add
    exactly 0 for such a row).
    """
    n = norms.to(torch.float64)
    if clipping == "abadi":  # min(1, +inf) = 1; NaN: 0
        c = torch.nan_to_num(bound / (n + ABADI_EPS), nan=0.0, posinf=1.0).clamp_(0.0, 1.0)
    elif clipping == "automatic":
        c = torch.nan_to_num(bound / (n + gamma), nan=0.0, posinf=0.0).clamp_min_(0.0)
    else:
        raise ValueError(f"clipping must be one of {CLIP_FUNCTIONS}, got {clipping!r}")
    # 1 - 2^-50 = 1 - 8u covers the roundings between the exact n and c: the caller's sqrt of a squared
    # norm and n + eps (each at most a factor 1 - u low), R / d (a reciprocal and a product, 1 + u each)
    # and this product (1 + u): (1 + u)^3 (1 - 8u) / (1 - u)^2 < 1
    # below the smallest normal float64 a quotient is rounded in absolute steps (2^-1074), up by as much as
    # half of itself: such a factor is 0 (the margin covers the relative rounding of normal ones only)
    c = torch.threshold(c.mul_(1.0 - 2.0**-50), torch.finfo(torch.float64).tiny, 0.0)
    if norms.dtype == torch.float64:
        return c
    c32 = c.to(torch.float32)  # round to nearest, then one ulp down where that rounded up
    return torch.where(c32.to(torch.float64) > c, torch.nextafter(c32, torch.zeros_like(c32)), c32)


GroupSpec = str | Sequence[Sequence[str]] | Callable[[str, nn.Module], Any]


def resolve_groups(
    modules: dict[str, nn.Module], params: dict[str, list[nn.Parameter]], groups: GroupSpec
) -> list[list[nn.Parameter]]:
    """Split the trainable parameters of the DP modules into clipping groups.

    modules: name -> DP module; params: name -> its trainable parameters (a
    parameter shared by several modules is listed under each and placed once,
    with the first module that names it).
    groups: "all-layer", "layer-wise", "param-wise", a list of lists of module
    names, or a callable (module name, module) -> group key.
    Groups come in the order of the user's list (a list of bounds follows it),
    else in the order of their first layer in the model.
    """
    key_of: dict[str, Any]
    if groups == "all-layer":
        key_of = dict.fromkeys(modules, 0)
    elif groups == "layer-wise":
        key_of = {n: n for n in modules}
    elif groups == "param-wise":
        out: list[list[nn.Parameter]] = []
        seen: set[int] = set()
        for n in modules:
            for p in params[n]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append([p])
        return out
    elif callable(groups):
        key_of = {n: groups(n, m) for n, m in modules.items()}
    elif isinstance(groups, str):
        raise ValueError(
            f"groups must be one of {GROUP_MODES}, a list of lists of module names or a callable, got {groups!r}"
        )
    else:
        key_of = {}
        for gi, names in enumerate(groups):
            if isinstance(names, str):
                raise TypeError(f"groups[{gi}] is the string {names!r}: give a list of module names per group")
            for n in names:
                if n not in modules:
                    raise ValueError(
                        f"groups[{gi}] names {n!r}, which is not a DP layer with trainable parameters; "
                        f"known layers: {sorted(modules)}"
                    )
                if n in key_of:
                    raise ValueError(f"module {n!r} is listed in two clipping groups ({key_of[n]} and {gi})")
                key_of[n] = gi
        missing = [n for n in modules if n not in key_of]
        if missing:
            raise ValueError(f"these DP layers with trainable parameters are in no clipping group: {missing}")
    by_key: dict[Any, list[nn.Parameter]] = {}
    seen = set()
    for n in modules:
        for p in params[n]:
            if id(p) not in seen:
                seen.add(id(p))
                by_key.setdefault(key_of[n], []).append(p)
    if not (callable(groups) or isinstance(groups, str)):
        # the user's order: a list of bounds in max_grad_norm is given in this order
        empty = [gi for gi in range(len(groups)) if gi not in by_key]
        if empty:
            raise ValueError(
                f"clipping group(s) {empty} of {list(map(list, groups))} have no trainable parameter of their own "
                f"(a parameter shared by several layers belongs to the group of the first one)"
            )
        return [by_key[gi] for gi in range(len(groups))]
    return list(by_key.values())


def group_bounds(max_grad_norm: float | Sequence[float], n_groups: int) -> list[float]:
    """Per-group bounds: a float R gives R / sqrt(G) to each of G groups (so R_total = R)."""
    if isinstance(max_grad_norm, int | float):
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be positive and finite, got {max_grad_norm}")
        return [float(max_grad_norm) / math.sqrt(n_groups)] * n_groups
    bounds = [float(b) for b in max_grad_norm]
    if len(bounds) != n_groups:
        raise ValueError(f"max_grad_norm has {len(bounds)} bounds for {n_groups} clipping groups")
    if any(not (b > 0 and math.isfinite(b)) for b in bounds):
        raise ValueError(f"every bound in max_grad_norm must be positive and finite, got {bounds}")
    return bounds


def total_bound(bounds: Sequence[float]) -> float:
    """R_total = sqrt(sum_g R_g^2): the sensitivity of the whole update."""
    return math.sqrt(sum(b * b for b in bounds))


__all__ = ["clip_factors", "resolve_groups", "group_bounds", "total_bound", "torch"]
