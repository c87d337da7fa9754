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


# Entries of the unscaled operand of a Linear clipped sum masked (so copied) at a time: 16 MiB in float32.
_MASK_ELEMS = 1 << 22


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
    B, T, d, p = a.shape[0], a.shape[1], a.shape[-1], g.shape[-1]
    drop = c == 0
    # c_i scales the narrower of G_i (T, p) and A_i (T, d): sum_i (c_i G_i)^T A_i = sum_i G_i^T (c_i A_i), so a
    # language model's head (p = V) makes no scaled copy of G. The other operand's rows of samples with c_i = 0
    # are set to 0 too (0 * inf is NaN), a block of rows at a time, so that its masked copy stays below
    # _MASK_ELEMS entries. flatten, not reshape(-1, p): p or d may be 0.
    scale_a = d < p
    narrow = kept(a if scale_a else g, drop, dt, c)  # c_i A_i or c_i G_i, (B, T, .)
    wide = g if scale_a else a
    b = narrow.sum(dim=(0, 1)) if bias and not scale_a else None
    step = max(1, _MASK_ELEMS // max(1, wide.shape[-1]))
    if step >= B * T:  # one block: the whole operand masked at once
        m = kept(wide, drop, dt)
        x, y = (m.flatten(0, 1).T, narrow.flatten(0, 1)) if scale_a else (narrow.flatten(0, 1).T, m.flatten(0, 1))
        w = finish_mm(x, y, prev_w, noise_std, scale, seed_w)
        if bias and scale_a:
            b = torch.einsum("btp,b->p", m, c.to(dt))
    else:
        nf, wf = narrow.flatten(0, 1), wide.flatten(0, 1)
        row_drop = drop[:, None].expand(B, T).reshape(-1)
        row_c = c.to(dt)[:, None].expand(B, T).reshape(-1)
        w = torch.zeros(p, d, device=g.device, dtype=dt)
        if bias and scale_a:
            b = torch.zeros(p, device=g.device, dtype=dt)
        for k in range(0, B * T, step):
            sl = slice(k, k + step)
            m = kept(wf[sl], row_drop[sl], dt)
            if scale_a:
                w.addmm_(m.T, nf[sl])
                if b is not None:
                    b.addmv_(m.T, row_c[sl])
            else:
                w.addmm_(nf[sl].T, m)
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
    total = torch.einsum("btp,b->p", kept(g, c == 0, dt), c.to(dt))
    return finish(total, prev, noise_std, scale, seed, fresh=True)
