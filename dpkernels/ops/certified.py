"""Certified per-sample squared norms: the norms the engine clips by, for every backend.

Each function has the signature of the raw op of the same name (dpkernels.ops.<op>) and returns float64
(B,) upper bounds on the exact squared norms of the gradients of the given tensors (see
dpkernels/ops/bounds.py for the model and `Bound`). The backend that serves the raw op serves these
if it has ``<op>_bound`` (Triton has its own for every op but the tied cross term); otherwise the
reference's bound serves (tight, plain torch ops on any device: the compiled backend's ops, Triton's
cross term). Only an op the reference has no bound for has its raw squared norm certified here from
per-token norms and the backend's declared arithmetic (`bounds.generic_bound`): rigorous, but loose on
natural data (certified/exact 8-170x for GPT-2 Linear shapes, ~T x for an Embedding of T distinct ids),
which over-clips every sample by that factor.
``*_bound`` variants return the `Bound` itself, for sums with signed terms (the tied cross term).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

from . import _load, _validate, acc_dtype, resolve_named
from . import reference as _ref
from .bounds import F64, Bound, check_gradual_underflow, generic_bound, round_up_factor, signed_sum, token_norms

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _bound_arithmetic(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a bound in the arithmetic its proof assumes. Gradual underflow on the calling thread
    (`bounds.check_gradual_underflow`: flush-to-zero is refused). Autocast off (on the CPU and on the
    inputs' device): the norms are formed in the Backward, where the caller's autocast is still on, and
    autocast would cast the bounds' float32 matmuls (Grams, instantiated weights, unfolded convolutions) to
    16 bits, an error no constant accounts for (natural float32 rows under CPU bfloat16 autocast: certified
    0.9984x the exact norm)."""

    @functools.wraps(fn)
    def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        check_gradual_underflow()  # the calling thread's arithmetic (the engine probes the workers too)
        devs = {"cpu"} | {t.device.type for t in args if isinstance(t, Tensor)}
        on = sorted(d for d in devs if torch.amp.is_autocast_available(d) and torch.is_autocast_enabled(d))
        if not on:  # nothing to turn off (the usual case): no context to enter
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for dev in on:
                stack.enter_context(torch.autocast(dev, enabled=False))
            return fn(*args, **kwargs)

    return wrapped


def _own(op: str, backend: str | None, *args, **kwargs):
    """(the serving backend's own ``op``_bound, else the reference's, else None; the raw op), after the op's
    input checks (the dispatcher's: the same inputs refused, the same way, as the raw op)."""
    getattr(_validate, op)(*args, **kwargs)
    raw, name = resolve_named(op, args[0], backend)
    own = getattr(_load(name), f"{op}_bound", None)
    return (own if own is not None else getattr(_ref, f"{op}_bound", None)), raw


def _generic_rows(raw: Tensor, a: Tensor, g: Tensor, groups: int = 1) -> Bound:
    """generic_bound of a Linear-like weight norm over row blocks a (B*groups, T, d), g (B*groups, T, p).

    C = sum_t |a_t||g_t| as one float64 dot of the token norms per block, summed over groups."""
    T, d, p = a.shape[1], a.shape[2], g.shape[2]
    na, ng = token_norms(a), token_norms(g)
    c2 = torch.bmm(na[:, None, :], ng[:, :, None]).square()
    sa, sg = na.sum(dim=1), ng.sum(dim=1)
    abs_scale = torch.addcmul(sa.square(), sg, sg)
    if groups > 1:
        c2, abs_scale = c2.view(-1, groups).sum(dim=1), abs_scale.view(-1, groups).sum(dim=1)
    # ghost: Gram, product, the groups' T^2 terms; inst: dot, the groups' p d squares. The groups' terms
    # may be summed in one reduction in any order (Triton sums a sample's (group, tile) partials flat).
    n_chain = max(groups * T * T + d + p, T + groups * p * d) + 4
    n_abs = groups * (T * T * (d + p + 1) + T * p * d)  # every product either method forms
    f = round_up_factor(T + groups + 8)  # the dot (length T) and the square, sum over groups and sqrt
    return generic_bound(raw, c2.view(-1).sqrt() * f, abs_scale, n_chain, n_abs, acc_dtype(a, g))


def _generic_bias(raw: Tensor, g: Tensor, groups: int = 1) -> Bound:
    """generic_bound of ||sum_t g_t||^2, g (B, T, p), formed either from the token sums (T-sum, p squares)
    or as sum(G G^T) per group (Triton's ghost kernels: a p-long Gram entry, then the groups' T^2 terms in
    any order); the absolute terms of either add up to at most S^2, S = sum_t |g_t|."""
    T, p = g.shape[1], g.shape[2]
    S = token_norms(g, round_up_factor(T + 2)).sum(dim=1)
    return generic_bound(raw, S, S.square() + T * T, groups * T * T + T + p + 2, T * T * p + T * p + p, acc_dtype(g))


@_bound_arithmetic
def linear_norms_bound(a: Tensor, g: Tensor, *, bias: bool, method: str, backend: str | None = None):
    own, raw = _own("linear_norms", backend, a, g, bias=bias, method=method)
    if own is not None:
        return own(a, g, bias=bias, method=method)
    rw, rb = raw(a, g, bias=bias, method=method)
    return _generic_rows(rw, a, g), (_generic_bias(rb, g) if bias else None)


@_bound_arithmetic
def bias_norms_bound(g: Tensor, *, backend: str | None = None) -> Bound:
    own, raw = _own("bias_norms", backend, g)
    if own is not None:
        return own(g)
    return _generic_bias(raw(g), g)


@_bound_arithmetic
def conv_norms_bound(x: Tensor, g: Tensor, *, backend: str | None = None, **kw):
    own, raw = _own("conv_norms", backend, x, g, **kw)
    if own is not None:
        return own(x, g, **kw)
    rw, rb = raw(x, g, **kw)
    geom = {k: kw[k] for k in ("kernel_size", "stride", "padding", "dilation", "groups")}
    a, gr = _ref.conv_rows(x, g, **geom)
    wb = _generic_rows(rw, a, gr, kw["groups"])
    return wb, (_generic_bias(rb, g.flatten(2).transpose(1, 2), kw["groups"]) if kw["bias"] else None)


@_bound_arithmetic
def embedding_norms_bound(
    ids: Tensor, g: Tensor, *, num_embeddings: int, padding_idx: int | None, backend: str | None = None
) -> Bound:
    own, raw = _own("embedding_norms", backend, ids, g, num_embeddings=num_embeddings, padding_idx=padding_idx)
    if own is not None:
        return own(ids, g, num_embeddings=num_embeddings, padding_idx=padding_idx)
    # gram: sum_{t,s} [x_t = x_s] g_t . g_s (length-D dots, T^2 sum); scan: row sums, then squares.
    rows = g.reshape(*ids.shape, g.shape[-1])
    T, D = rows.shape[1], rows.shape[2]
    S = token_norms(rows, round_up_factor(T + 2)).sum(dim=1)
    r = raw(ids, g, num_embeddings=num_embeddings, padding_idx=padding_idx)
    return generic_bound(r, S, S.square() + T * T, T * T + T * D + 4, T * T * D + T * D, acc_dtype(g))


@_bound_arithmetic
def embedding_linear_cross_bound(
    ids: Tensor, g_e: Tensor, a: Tensor, g_h: Tensor, *, padding_idx: int | None, backend: str | None = None
) -> Bound:
    own, raw = _own("embedding_linear_cross", backend, ids, g_e, a, g_h, padding_idx=padding_idx)
    if own is not None:
        return own(ids, g_e, a, g_h, padding_idx=padding_idx)
    x = raw(ids, g_e, a, g_h, padding_idx=padding_idx)
    # |X| <= sum_{t,s} |g_h[s, x_t]| |a_s| |g_e,t| = q: every rounded term of X is bounded by q's terms.
    Th, Te, D = a.shape[1], ids.shape[1], a.shape[2]
    P = torch.gather(g_h, 2, ids[:, None, :].expand(-1, Th, -1)).to(F64).abs()
    q = (token_norms(a, round_up_factor(Th + Te + 4))[:, None, :] @ P @ token_norms(g_e)[:, :, None]).flatten()
    n = Th * Te * D
    bnd = generic_bound(x, q.sqrt(), q + Te * D, Th + Te * D + 4, n + Te * D, acc_dtype(g_e, a, g_h))
    return Bound(bnd.value, bnd.err, torch.full_like(bnd.cap, math.inf))


@_bound_arithmetic
def affine_norms_bound(xhat: Tensor, g: Tensor, *, weight: bool, bias: bool, backend: str | None = None):
    own, raw = _own("affine_norms", backend, xhat, g, weight=weight, bias=bias)
    if own is not None:
        return own(xhat, g, weight=weight, bias=bias)
    rw, rb = raw(xhat, g, weight=weight, bias=bias)
    w = None
    if weight:
        T, C = g.shape[1], g.shape[2]
        S = token_norms(xhat.to(F64) * g, round_up_factor(T + 2)).sum(dim=1)
        w = generic_bound(rw, S, S.square() + T * T * C, T + C + 4, 2 * T * C, acc_dtype(xhat, g))
    return w, (_generic_bias(rb, g) if bias else None)


# ----------------------------------------------------------------------------- certified norms


def _c(b: Bound | None) -> Tensor | None:
    return None if b is None else b.certified()


def linear_norms(a: Tensor, g: Tensor, *, bias: bool, method: str, backend: str | None = None):
    w, b = linear_norms_bound(a, g, bias=bias, method=method, backend=backend)
    return w.certified(), _c(b)


def bias_norms(g: Tensor, *, backend: str | None = None) -> Tensor:
    return bias_norms_bound(g, backend=backend).certified()


def conv_norms(x: Tensor, g: Tensor, *, backend: str | None = None, **kw):
    w, b = conv_norms_bound(x, g, backend=backend, **kw)
    return w.certified(), _c(b)


def embedding_norms(
    ids: Tensor, g: Tensor, *, num_embeddings: int, padding_idx: int | None, backend: str | None = None
) -> Tensor:
    return embedding_norms_bound(
        ids, g, num_embeddings=num_embeddings, padding_idx=padding_idx, backend=backend
    ).certified()


def affine_norms(xhat: Tensor, g: Tensor, *, weight: bool, bias: bool, backend: str | None = None):
    w, b = affine_norms_bound(xhat, g, weight=weight, bias=bias, backend=backend)
    return _c(w), _c(b)


def tied_total(parts: list[Bound], cross: Bound | None) -> Bound:
    """Bound of ||dE + dH||^2 = ||dE||^2 + ||dH||^2 + 2 <dE, dH> from the two norms' bounds and the
    cross term's (|X - value| <= err); capped by (sqrt(cap_E) + sqrt(cap_H))^2 (triangle inequality)."""
    total = parts[0]
    for p in parts[1:]:
        total = total.plus(p)
    if cross is None or len(parts) < 2:
        return total
    cap = (parts[0].cap.sqrt() + parts[1].cap.sqrt()).square() * round_up_factor(8)
    value, err = (torch.stack([t, 2.0 * x]) for t, x in zip(total[:2], cross[:2], strict=True))
    return Bound(*signed_sum(value, err, 0), cap)  # the signed cross value's rounding goes into err
