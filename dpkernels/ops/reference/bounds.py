"""Reference norms with rigorous error bounds: what the engine clips by (see dpkernels/ops/bounds.py).

Each ``*_bound`` op returns, per sample, a `Bound` (value, err, cap) of the exact squared norm of the
gradient of the given (stored) tensors, float64 (B,): n <= value + err and n <= cap. Its
``certified()`` is the norm the engine clips by. Common to all (u, eta: unit roundoff and underflow
unit of the accumulation dtype, float32 or float64; gamma_n = n u / (1 - n u)):

- Range: each sample's rows are scaled by a power of two s_i (max |entry| in [1/2, 1), `pow2_scale`)
  before any float32 arithmetic, so nothing overflows and underflow errs by at most eta per product,
  tiny against the scaled sample's own size; the bound of the scaled rows is divided by s_i^2 at the
  end (exact). Entries that become subnormal when scaled down move the exact norm of the scaled rows by
  at most delta = 2 T eta sqrt(#entries), added to the norm.
- Sums over tokens (bias, norm layers' affine weights, embedding rows, the instantiated weight's
  chunks) run in float64, where the products of two float32 numbers are exact and a sum of N terms
  errs by at most gamma_N(2^-53) of their absolute sum.
- Every bound is also capped by the per-token triangle inequality, n <= (sum_t |x_t| |y_t|)^2.

On natural data the certified squared norm exceeds the exact one by ~7.5e-4 (GPT-2-shaped ghost norms
on random activations, float32 dots of length _CHUNK = 1024), more when all tokens share a large common
direction, 1e-4 on the demo CNN;
python -m bench.certify_norms measures it and the cost.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..bounds import (
    F64,
    U64,
    Bound,
    dot_gamma,
    from_norm_error,
    gamma,
    matmul_input_roundoff,
    pow2_scale,
    round_up_factor,
    scale_rows,
    token_norms,
    underflow_eta,
    unit_roundoff,
)
from ._common import _chunks, acc_dtype, group_keys
from .conv import _ntuple, conv_rows
from .embedding import _pad_mask

# Length of the float32 dot products: the ghost Grams' d- and p-long dots and the instantiated norm's
# T-long ones are cut into chunks of this length whose results are summed in float64, so the float32
# error is gamma_1024 (6.1e-5), not gamma_d or gamma_T (d = 3072: 1.8e-4; T = 1e5 pixels: no bound).
# Measured on GPT-2 block shapes (bench/certify_norms.py, B=4, T=256, one CPU thread), certified time /
# raw time and certified / exact - 1: 256: 2.0-2.3x, 2.0e-4; 1024: 1.6x, 7.5e-4 (a norm 0.04% high, far
# below the noise); 4096: 1.5x, 1.7e-3. Each chunk is a separate matmul plus a float64 accumulation.
_CHUNK = 1024


def _unscale(b: Bound, s2: Tensor) -> Bound:
    """A bound of the scaled rows' squared norm -> of the unscaled ones (s2 = (s_a s_g)^2, a power of 2)."""
    return Bound(b.value / s2, b.err / s2, b.cap / s2)


def _with_scaling_error(b: Bound, cap_norm: Tensor, delta: float) -> Bound:
    """n <= (sqrt(m) + delta)^2 <= value + err + 2 delta cap_norm + delta^2, cap (cap_norm + delta)^2."""
    f = round_up_factor(8)
    return Bound(b.value, (b.err + 2.0 * delta * cap_norm + delta * delta) * f, (cap_norm + delta).square() * f)


def _quad(u: Tensor, M: Tensor, v: Tensor) -> Tensor:
    """u_b^T M_b v_b per row block: (b, S), (b, S, T), (b, T) -> (b,)."""
    return (u[:, None, :] @ M @ v[:, :, None]).flatten()


def _gram(x: Tensor, u: float, u_in: float, eta: float) -> tuple[Tensor, float, float]:
    """X = A A^T (b, T, T) in float64 from float32 (or float64) chunks of _CHUNK columns, with its error
    bound |X - A A^T| <= rel |a_t||a_s| + abs (entrywise).

    Each chunk's Gram is one matmul in the accumulation dtype, error <= gamma_K |a_t^c||a_s^c| + K eta;
    the chunks are summed in float64 (gamma_{nc}(2^-53) more), and sum_c |a_t^c||a_s^c| <= |a_t||a_s|
    (Cauchy-Schwarz twice). Cutting the d-long dot products into K-long ones is what makes the bound
    tight: gamma_K instead of gamma_d (d = 3072: 6.1e-5 relative at K = 1024 against 1.8e-4)."""
    d = x.shape[2]
    X = torch.zeros(x.shape[0], x.shape[1], x.shape[1], device=x.device, dtype=F64)
    for k0 in range(0, d, _CHUNK):
        c = x[:, :, k0 : k0 + _CHUNK]
        X += (c @ c.transpose(1, 2)).to(F64)
    n_chunks = max(1, math.ceil(d / _CHUNK))
    g = dot_gamma(min(d, _CHUNK), u, u_in)
    return X, g + gamma(n_chunks, U64) * (1.0 + g), d * eta


def _ghost(a: Tensor, g: Tensor) -> Bound:
    """Ghost norm <A A^T, G G^T> of each row block with its bound; a: (b, T, d), g: (b, T, p).

    X = A A^T, Y = G G^T by `_gram` (float32 chunks summed in float64); with n_a, n_g the token norms,

        |X - A A^T| <= alpha = gamma'_d n_a n_a^T + d eta,   |Y - G G^T| <= beta = gamma'_p n_g n_g^T + p eta
        |<X, Y> - <A A^T, G G^T>| <= sum_{t,s} alpha |Y| + |X| beta + alpha beta

    (XY - xy = (X - x) Y + X (Y - y) - (X - x)(Y - y)). <X, Y> and the error sum are taken in float64
    (X Y products of float64 numbers, T^2-term sums: gamma_{T^2}(2^-53) of the absolute sum). n_a comes
    from X's diagonal: |a_t|^2 <= (X_tt + d eta) / (1 - gamma'_d). This bound weighs each pair by |Y_ts|
    (resp. |X_ts|), so on natural data it is up to ~T / sqrt(p) times tighter than gamma U with
    U = (sum_t |a_t||g_t|)^2, the cap (measured: bench/certify_norms.py).
    """
    dt = acc_dtype(a, g)
    T, d, p = a.shape[1], a.shape[2], g.shape[2]
    u, eta, u_in = unit_roundoff(dt), underflow_eta(dt), matmul_input_roundoff(dt)
    sa, sg = pow2_scale(a, dt), pow2_scale(g, dt)
    X, gd, ad = _gram(scale_rows(a, sa, dt), u, u_in, eta)
    Y, gp, ap = _gram(scale_rows(g, sg, dt), u, u_in, eta)
    f = round_up_factor(4)
    na = ((X.diagonal(dim1=1, dim2=2) + ad) / (1.0 - gd)).clamp_min(0.0).sqrt() * f
    ng = ((Y.diagonal(dim1=1, dim2=2) + ap) / (1.0 - gp)).clamp_min(0.0).sqrt() * f
    # sum alpha |Y| + |X| beta + alpha beta, with alpha = gd na na^T + ad, beta = gp ng ng^T + ap, as
    # quadratic forms: gd na^T |Y| na + ad sum|Y| + gp ng^T |X| ng + ap sum|X| + sum alpha beta
    Ya, Xa = Y.abs(), X.abs()
    quad_y = _quad(na, Ya, na)
    quad_x = _quad(ng, Xa, ng)
    sum_ang = (na * ng).sum(dim=1)
    sum_na2, sum_ng2 = na.sum(dim=1).square(), ng.sum(dim=1).square()
    err = gd * quad_y + ad * Ya.sum(dim=(1, 2)) + gp * quad_x + ap * Xa.sum(dim=(1, 2))
    err = err + gd * gp * sum_ang.square() + gd * ap * sum_na2 + ad * gp * sum_ng2 + ad * ap * T * T
    XY = X * Y
    value = XY.sum(dim=(1, 2))
    err = (err + gamma(T * T, U64) * XY.abs().sum(dim=(1, 2))) * round_up_factor(T * T + 16)
    cap_norm = sum_ang * round_up_factor(T + 4)
    b = _with_scaling_error(Bound(value, err, cap_norm.square()), cap_norm, 2.0 * T * eta * math.sqrt(d * p))
    return _unscale(b, (sa * sg).square())


def _inst(a: Tensor, g: Tensor, keep: Tensor | None = None) -> Bound:
    """Instantiated ||G^T A||_F^2 of each row block with its bound; a: (b, T, d), g: (b, T, p).

    W = sum over chunks c of _CHUNK tokens of fl(G_c^T A_c), summed in float64. Entrywise,
    |W - G^T A| <= (gamma_K + gamma_{T/K}(2^-53)(1 + gamma_K)) (|G|^T |A|) + T eta (K = _CHUNK), and
    || |G|^T |A| ||_F <= sum_t |a_t| |g_t| = S (triangle inequality), so
    ||G^T A|| <= sqrt(fl(sum W^2)(1 + gamma_{pd}(2^-53))) + gamma' S + T eta sqrt(p d).

    ``keep`` (k, p, d) bool, k dividing b (block j uses keep[j % k]): the norm of the kept entries
    only, ||keep * G^T A|| (pruning, dpkernels.pruning). Zeroing entries is a projection: it shrinks
    the error term and the exact norm alike, so every bound above holds for the masked norm unchanged.
    """
    dt = acc_dtype(a, g)
    T, d, p = a.shape[1], a.shape[2], g.shape[2]
    u, eta, u_in = unit_roundoff(dt), underflow_eta(dt), matmul_input_roundoff(dt)
    sa, sg = pow2_scale(a, dt), pow2_scale(g, dt)
    A, G = scale_rows(a, sa, dt), scale_rows(g, sg, dt)
    W = torch.zeros(a.shape[0], p, d, device=a.device, dtype=F64)
    for t0 in range(0, T, _CHUNK):
        W += (G[:, t0 : t0 + _CHUNK].transpose(1, 2) @ A[:, t0 : t0 + _CHUNK]).to(F64)
    if keep is not None:
        W = torch.where(keep, W.view(-1, *keep.shape), 0.0).view(W.shape)
    value = W.square().sum(dim=(1, 2))
    n_chunks = max(1, math.ceil(T / _CHUNK))
    g_dot = dot_gamma(min(T, _CHUNK), u, u_in)
    g_all = g_dot + gamma(n_chunks, U64) * (1.0 + g_dot)
    S = (token_norms(A) * token_norms(G)).sum(dim=1) * round_up_factor(T + 4)
    delta = 2.0 * T * eta * math.sqrt(d * p)
    abs_norm = g_all * S + T * eta * math.sqrt(d * p) + delta
    b = from_norm_error(value, gamma(p * d + 1, U64), abs_norm, S + delta)
    return _unscale(b, (sa * sg).square())


def _rows64(x: Tensor) -> tuple[Tensor, Tensor, float]:
    """x as float64, scaled per sample when x is float64 itself (float32 and 16-bit values neither
    overflow nor underflow in float64 products and sums); the scale s (B,) and eta for the products."""
    if x.dtype != torch.float64:
        return x.to(F64), torch.ones(x.shape[0], device=x.device, dtype=F64), 0.0
    s = pow2_scale(x, F64)
    return scale_rows(x, s, F64), s, underflow_eta(F64)


def _sum_bound(v: Tensor, S: Tensor, T: int, n_entries: int, eta: float, s2: Tensor) -> Bound:
    """Bound of ||v_exact||^2 where v (B, m) is a float64 sum over T tokens of per-token vectors whose
    2-norms sum to S: |v - v_exact| <= gamma_T(2^-53) |.|-sums entrywise, whose norm is <= gamma_T S,
    plus T eta per entry of underflowing products (float64 inputs only); s2 unscales."""
    value = v.square().sum(dim=1)
    abs_norm = gamma(T + 1, U64) * S + 3.0 * T * eta * math.sqrt(n_entries)
    return _unscale(from_norm_error(value, gamma(n_entries + 1, U64), abs_norm, S), s2)


def linear_norms_bound(a: Tensor, g: Tensor, *, bias: bool, method: str) -> tuple[Bound, Bound | None]:
    """Bounds of the per-sample squared norms of linear_norms (weight by ``method``, bias); see _ghost,
    _inst and bias_norms_bound. a: (B, T, d), g: (B, T, p)."""
    if method not in ("ghost", "inst"):
        raise ValueError(f"linear_norms: method must be 'ghost' or 'inst', got {method!r}")
    B, T, d = a.shape
    p = g.shape[-1]
    if T == 1 and acc_dtype(a, g) != F64:
        return _one_token(a, g), (bias_norms_bound(g) if bias else None)
    parts = []
    per_sample = 4 * T * T if method == "ghost" else 2 * p * d + T * (d + p)
    for sl in _chunks(B, per_sample):
        parts.append((_ghost if method == "ghost" else _inst)(a[sl], g[sl]))
    w = Bound(*(torch.cat([getattr(b, f) for b in parts]) for f in Bound._fields)) if parts else _empty(a)
    return w, (bias_norms_bound(g) if bias else None)


def _one_token(a: Tensor, g: Tensor) -> Bound:
    """One token per sample (a Linear on vectors: MLPs, a CNN's head): the exact squared norm is
    |g_1 a_1^T|_F^2 = |a_1|^2 |g_1|^2, bounded by the product of the float64 token norms (`token_norms`:
    upper bounds, no overflow or underflow for float32 and 16-bit values): no Gram, no matmul, and
    tight to float64 rounding, so it is both the value and the cap."""
    up = (token_norms(a)[:, 0] * token_norms(g)[:, 0] * round_up_factor(2)).square() * round_up_factor(2)
    return Bound(up, torch.zeros_like(up), up)


def _empty(x: Tensor) -> Bound:
    z = torch.zeros(x.shape[0], device=x.device, dtype=F64)
    return Bound(z, z, z)


def bias_norms_bound(g: Tensor) -> Bound:
    """Bound of ||sum_t g_t||^2 per sample, g: (B, T, p); the sum in float64 (see _sum_bound)."""
    B, T, p = g.shape
    if B == 0 or T == 0 or p == 0:
        return _empty(g)
    G, s, eta = _rows64(g)
    S = token_norms(G).sum(dim=1) * round_up_factor(T + 4)
    return _sum_bound(G.sum(dim=1), S, T, p, eta, s.square())


def conv_norms_bound(
    x: Tensor, g: Tensor, *, kernel_size, stride, padding, dilation, groups: int, bias: bool, method: str
) -> tuple[Bound, Bound | None]:
    """Bounds of conv_norms: the Linear bounds of each (sample, group) row block of the unfolded input,
    summed over groups (squared norms of disjoint blocks add, and so do their bounds)."""
    if method not in ("ghost", "inst"):
        raise ValueError(f"conv_norms: method must be 'ghost' or 'inst', got {method!r}")
    B = x.shape[0]
    n = x.dim() - 2
    T = math.prod(g.shape[2:])
    per_sample = 4 * T * x.shape[1] * math.prod(_ntuple(kernel_size, n, "kernel_size"))
    geom = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups)
    parts = []
    for sl in _chunks(B, per_sample):
        a, gr = conv_rows(x[sl], g[sl], **geom)  # type: ignore[arg-type]
        wb, _ = linear_norms_bound(a, gr, bias=False, method=method)
        parts.append(Bound(*(t.view(-1, groups).sum(dim=1) for t in wb)))
    w = Bound(*(torch.cat([getattr(b, f) for b in parts]) for f in Bound._fields)) if parts else _empty(x)
    return w, (bias_norms_bound(g.flatten(2).transpose(1, 2)) if bias else None)


def embedding_norms_bound(ids: Tensor, g: Tensor, *, num_embeddings: int, padding_idx: int | None) -> Bound:
    """Bound of embedding_norms: rows summed per (sample, id) in float64 (index_add), then squared;
    the error of a row sum is <= gamma_T(2^-53) sum_t |g_t| entrywise (see _sum_bound), padding excluded."""
    B = ids.shape[0]
    if ids.numel() == 0 or B == 0:
        return _empty(g.reshape(B, -1))
    D = g.shape[-1]
    T = ids.shape[1]
    rows = g.reshape(*ids.shape, D)
    rows, s, eta = _rows64(rows)
    keep = _pad_mask(ids, padding_idx, num_embeddings)
    if keep is not None:
        rows = torch.where(keep[..., None], rows, 0)
    S = token_norms(rows).sum(dim=1) * round_up_factor(T + 4)
    keys = (torch.arange(B, device=ids.device)[:, None] * num_embeddings + ids).reshape(-1)
    inv, key_of = group_keys(keys)
    summed = torch.zeros(keys.numel(), D, device=g.device, dtype=F64).index_add_(0, inv, rows.reshape(-1, D))
    sample = torch.where(key_of >= 0, key_of // num_embeddings, 0)  # unused groups are zero rows
    value = torch.zeros(B, device=g.device, dtype=F64).index_add_(0, sample, summed.square().sum(1))
    abs_norm = gamma(T + 1, U64) * S + 3.0 * T * eta * math.sqrt(D)
    return _unscale(from_norm_error(value, gamma(T * D + 1, U64), abs_norm, S), s.square())


def embedding_linear_cross_bound(ids: Tensor, g_e: Tensor, a: Tensor, g_h: Tensor, *, padding_idx: int | None) -> Bound:
    """Bound of the cross term <dE_i, dH_i> of embedding_linear_cross (signed: |X - value| <= err;
    cap inf, the caller caps the tied total by (|dE| + |dH|)^2).

    With P[s, t] = g_h[s, x_t] (scaled per sample by a power of two, as are a and, for float64, g_e),
    M = fl(P^T A) in the accumulation dtype (length Th dots) and X = sum_t g_e,t . M_t in float64:
    |M - P^T A| <= gamma_Th |P|^T |A| + Th eta, so
    |X - exact| <= gamma_Th sum_{t,s} |P_st| |a_s| |g_e,t| + Th eta sqrt(D) sum_t |g_e,t|
                  + gamma_{Te D}(2^-53) sum |M| |g_e| + (scaling: eta (sum_s |a_s|)(sum_t |g_e,t|)(1 + sqrt(D) Th)).
    """
    dt = acc_dtype(g_e, a, g_h)
    B, Te = ids.shape
    Th, D, V = a.shape[1], a.shape[2], g_h.shape[2]
    inf = torch.full((B,), math.inf, device=g_e.device, dtype=F64)
    if B == 0 or Te == 0 or Th == 0:
        z = torch.zeros(B, device=g_e.device, dtype=F64)
        return Bound(z, z, inf)
    u, eta, u_in = unit_roundoff(dt), underflow_eta(dt), matmul_input_roundoff(dt)
    keep = _pad_mask(ids, padding_idx, V)
    vals, errs = [], []
    for sl in _chunks(B, 2 * (Th * Te + Te * D)):
        idx = ids[sl][:, None, :].expand(-1, Th, -1)
        P = torch.gather(g_h[sl], 2, idx).to(dt)
        ge = g_e[sl]
        if keep is not None:
            P = torch.where(keep[sl][:, None, :], P, 0)
            ge = torch.where(keep[sl][..., None], ge, 0)
        sp, sa = pow2_scale(P, dt), pow2_scale(a[sl], dt)
        Ps, As = scale_rows(P, sp, dt), scale_rows(a[sl], sa, dt)
        Ge, se, eta64 = _rows64(ge)
        M = (Ps.transpose(1, 2) @ As).to(F64)  # (b, Te, D)
        prod = M * Ge
        value = prod.sum(dim=(1, 2))
        na, ne = token_norms(As), token_norms(Ge)
        q = _quad(na, Ps.to(F64).abs(), ne)
        sum_ne, sum_na = ne.sum(dim=1), na.sum(dim=1)
        err = dot_gamma(Th, u, u_in) * q + Th * eta * math.sqrt(D) * sum_ne
        err = err + gamma(Te * D + 1, U64) * prod.abs().sum(dim=(1, 2))
        err = err + 2.0 * max(eta, eta64) * sum_na * sum_ne * (1.0 + math.sqrt(D) * Th)
        err = err * round_up_factor(Th * Te + Te * D + 8)
        s = sp * sa * se
        vals.append(value / s)
        errs.append(err / s)
    return Bound(torch.cat(vals), torch.cat(errs), inf)


def affine_norms_bound(xhat: Tensor, g: Tensor, *, weight: bool, bias: bool) -> tuple[Bound | None, Bound | None]:
    """Bounds of affine_norms: ||sum_t xhat_t * g_t||^2 and ||sum_t g_t||^2 per sample, sums and products
    in float64 (exact products for float32 and 16-bit inputs); see _sum_bound. xhat, g: (B, T, C)."""
    w = b = None
    B, T, C = g.shape
    if weight:
        if B == 0 or T == 0 or C == 0:
            w = _empty(g)
        else:
            X, sx, ex = _rows64(xhat)
            G, sg, eg = _rows64(g)
            P = X * G
            S = token_norms(P).sum(dim=1) * round_up_factor(T + 4)
            w = _sum_bound(P.sum(dim=1), S, T + 1, C, max(ex, eg), (sx * sg).square())
    if bias:
        b = bias_norms_bound(g)
    return w, b
