"""Reference Linear and bias ops (plain PyTorch)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import _chunks, acc_dtype, finish, finish_mm, kept

# ----------------------------------------------------------------------------- Linear


def linear_norm_method(T: int, d: int, p: int) -> str:
    """The FLOP rule: ghost costs T^2 (d + p) per sample, instantiation 2 T d p."""
    return "ghost" if T * (d + p) < 2 * d * p else "inst"


def linear_norms(a: Tensor, g: Tensor, *, bias: bool, method: str) -> tuple[Tensor, Tensor | None]:
    """Per-sample squared norms of a Linear layer's weight and bias gradients.

    weight: ||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>          (method "ghost")
                              = sum_{p,d} (sum_t g_tp a_td)^2     (method "inst")
    bias:   ||sum_t g_t||^2
    a: (B, T, d), g: (B, T, p). Returns float32 (float64 for float64 inputs) tensors of shape (B,).
    """
    if method not in ("ghost", "inst"):
        raise ValueError(f"linear_norms: method must be 'ghost' or 'inst', got {method!r}")
    dt = acc_dtype(a, g)
    B, T, d = a.shape
    p = g.shape[-1]
    w = torch.empty(B, device=a.device, dtype=dt)
    per_sample = T * T if method == "ghost" else p * d
    for sl in _chunks(B, per_sample):
        ac, gc = a[sl].to(dt), g[sl].to(dt)
        if method == "ghost":
            w[sl] = (ac @ ac.transpose(1, 2) * (gc @ gc.transpose(1, 2))).sum(dim=(1, 2))
        else:
            w[sl] = (gc.transpose(1, 2) @ ac).square().sum(dim=(1, 2))
    return w, (bias_norms(g) if bias else None)


def _terms(a: Tensor, g: Tensor, c: Tensor, dt: torch.dtype, bias: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(X, Y, bias sum) with X @ Y = sum_i c_i G_i^T A_i over these samples, rows with c_i = 0 set to 0 in both
    operands (`kept`: 0 * inf is NaN). c_i scales the narrower of G_i (T, p) and A_i (T, d):
    sum_i (c_i G_i)^T A_i = sum_i G_i^T (c_i A_i), so a language model's head (p = V) scales no copy of G.
    flatten, not reshape(-1, p): p or d may be 0."""
    drop = c == 0
    if a.shape[-1] < g.shape[-1]:
        gk = kept(g, c, dt, drop=drop)
        b = torch.einsum("btp,b->p", gk, c.to(dt)) if bias else None
        return gk.flatten(0, 1).T, kept(a, c, dt, scaled=True, drop=drop).flatten(0, 1), b
    gs = kept(g, c, dt, scaled=True, drop=drop)
    return gs.flatten(0, 1).T, kept(a, c, dt, drop=drop).flatten(0, 1), (gs.sum(dim=(0, 1)) if bias else None)


def linear_clipped_sum(
    a: Tensor,
    g: Tensor,
    c: Tensor,
    *,
    bias: bool,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed_w: int = 0,
    seed_b: int = 0,
    prev_w: Tensor | None = None,
    prev_b: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Clipped, summed, noised Linear gradients.

    weight: scale * (prev_w + sum_i c_i G_i^T A_i + noise_std * z_w)   (p, d)
    bias:   scale * (prev_b + sum_i c_i sum_t g_it + noise_std * z_b)  (p,)
    A sample with c_i = 0 adds exactly 0, even with non-finite rows (_common.kept).
    """
    dt = acc_dtype(a, g)
    # chunks of samples bound the masked copies (`_terms`) as the norms bound their temporaries
    chunks = list(_chunks(g.shape[0], g.shape[1] * max(a.shape[-1], g.shape[-1])))
    if len(chunks) <= 1:
        x, y, b = _terms(a, g, c, dt, bias)
        w = finish_mm(x, y, prev_w, noise_std, scale, seed_w)
    else:
        w = torch.zeros(g.shape[-1], a.shape[-1], device=g.device, dtype=dt)
        b = torch.zeros(g.shape[-1], device=g.device, dtype=dt) if bias else None
        for sl in chunks:
            x, y, bc = _terms(a[sl], g[sl], c[sl], dt, bias)
            w.addmm_(x, y)
            if b is not None and bc is not None:
                b.add_(bc)
        w = finish(w, prev_w, noise_std, scale, seed_w, fresh=True)
    return w, (finish(b, prev_b, noise_std, scale, seed_b, fresh=True) if b is not None else None)


# ----------------------------------------------------------------------------- bias (Linear, Conv)


def bias_norms(g: Tensor) -> Tensor:
    """Per-sample squared norms of a bias gradient: ||sum_t g_t||^2, g: (B, T, p)."""
    return g.to(acc_dtype(g)).sum(dim=1).square().sum(dim=1)


def bias_clipped_sum(
    g: Tensor, c: Tensor, *, noise_std: float = 0.0, scale: float = 1.0, seed: int = 0, prev: Tensor | None = None
) -> Tensor:
    """scale * (prev + sum_i c_i sum_t g_it + noise_std * z), g: (B, T, p); c_i = 0 adds exactly 0."""
    dt = acc_dtype(g)
    total = torch.einsum("btp,b->p", kept(g, c, dt), c.to(dt))
    return finish(total, prev, noise_std, scale, seed, fresh=True)
