"""Reference norms with rigorous error bounds: what the engine clips by (see dpkernels/ops/bounds.py).

Each ``*_bound`` op returns, per sample, a `Bound` (value, err, cap) of the exact squared norm of the
gradient of the given (stored) tensors, float64 (B,): n <= value + err and n <= cap. Its
``certified()`` is the norm the engine clips by. Common to all (u, eta: unit roundoff and underflow
unit of the accumulation dtype, float32 or float64; gamma_n = n u / (1 - n u)):

- Range (Grams, instantiation): each sample's rows are scaled by a power of two s_i read off the
  exponent bits of its computed 2-norm (`pow2_scales`: s_i |x_i| in [1/2, 1), clamped to 2^+-100)
  before any float32 arithmetic, so nothing overflows and underflow errs by at most eta per product,
  tiny against the scaled sample's own size; the bound is divided by (s_a s_g)^2 at the end (exact).
  Entries that become subnormal when scaled move the rows by at most eta each (in the bounds' constants).
  The ghost bound skips the scaling (s = 1) for float32 rows on the CPU whose sample norms lie in
  [2^-21, 2^60) (`_unscaled_ok`): nothing can overflow there, and its absolute underflow constant is
  no larger than the scaled one.
- Sums over tokens (bias, norm layers' affine weights, embedding rows, the instantiated weight's
  chunks) run in float64, where the products of two float32 numbers are exact and a sum of N terms
  errs by at most gamma_N(2^-53) of their absolute sum; their bound needs only the rows' Frobenius
  norm (`_sum_bound`).
- Every bound is also capped by the triangle inequality, n <= (sum_t |x_t| |y_t|)^2 (the sum bounds:
  T ||x||_F^2).
- Each bound's last arithmetic is a handful of (B,) float64 ops with the constants folded in (once per
  shape: `_ghost_consts`, `_sum_consts`): 18 aten ops for a ghost norm on the CPU's unscaled route (~25
  scaled), 29 for an instantiated one, 6 for a bias, 9 for a norm layer's weight and bias together
  (`certified()` adds 3 each).

On natural data the certified squared norm exceeds the exact one by ~7.5e-4 (GPT-2-shaped ghost norms
on random activations, float32 dots of length _CHUNK = 1024), more when all tokens share a large common
direction, 1e-4 on the demo CNN, ~1e-11 for the float64 sums; python -m bench.certify_norms measures
it and the cost (bench/results/certify_norms.md).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..bounds import (
    F64,
    U64,
    Bound,
    CoveredBound,
    cover_coef,
    dot_gamma,
    gamma,
    matmul_input_roundoff,
    max_scaled_entry,
    pow2_scales,
    round_up_factor,
    sample_norms,
    scale_rows,
    token_norms,
    underflow_eta,
    unit_roundoff,
    unscale_sq,
)
from ._common import _chunks, acc_dtype, group_keys
from .conv import _ntuple, conv_rows
from .embedding import _pad_mask

# Length of the float32 dot products: the ghost Grams' d- and p-long dots and the instantiated norm's
# T-long ones are cut into chunks of this length whose results are summed in float64, so the float32
# error is gamma_1024 (6.1e-5), not gamma_d or gamma_T (d = 3072: 1.8e-4; T = 1e5 pixels: no bound).
# One chunk (one matmul, no float64 accumulation) whenever the length is at most this.
_CHUNK = 1024


def _pow2ceil(n: int) -> int:
    """The power of two >= n (gamma grows with n: a bound for the larger length holds for the smaller)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _gram(x: Tensor) -> Tensor:
    """X = A A^T (b, T, T) from _CHUNK-column chunks: one matmul in x's dtype when d <= _CHUNK, else the
    chunks' matmuls summed in float64 (`_gram_gamma` gives the error)."""
    d = x.shape[2]
    if d <= _CHUNK:
        return torch.bmm(x, x.transpose(1, 2))
    c = x[:, :, :_CHUNK]
    X = torch.bmm(c, c.transpose(1, 2)).to(F64)
    for k0 in range(_CHUNK, d, _CHUNK):
        c = x[:, :, k0 : k0 + _CHUNK]
        X += torch.bmm(c, c.transpose(1, 2)).to(F64)
    return X


def _gram_gamma(d: int, u: float, u_in: float) -> float:
    """Relative error of a `_gram` entry: |X - A A^T| <= g |a_t||a_s| + d eta (entrywise).

    Each chunk's Gram is one matmul, error <= gamma_K |a_t^c||a_s^c| + K eta (K <= _CHUNK); the chunks
    are summed in float64 (gamma_{nc}(2^-53) more), and sum_c |a_t^c||a_s^c| <= |a_t||a_s| (Cauchy-Schwarz
    twice). Cutting the d-long dot products into K-long ones is what makes the bound tight."""
    g = dot_gamma(min(d, _CHUNK), u, u_in)
    return g + gamma(max(1, math.ceil(d / _CHUNK)), U64) * (1.0 + g)


# Computed sample norms m for which `_ghost` forms the Gram of the stored float32 rows (`_unscaled_ok`):
# m in [2^-21, 2^60), the samples whose `pow2_scales` scale lies in [2^-60, 2^20].
_UNSCALED_NORMS = (2.0**-21, 2.0**60)


def _unscaled_ok(xs: tuple[Tensor, ...], m: Tensor, dt: torch.dtype) -> list[bool]:
    """Per operand x (computed sample norms m[k], `sample_norms` in ``dt``): whether `_ghost` may form its
    Gram from the stored rows with no scale at all (s = 1) instead of from the scaled copy s x. Yes when x
    is float32 on the CPU and every sample's m lies in [2^-21, 2^60) (one host read: free on the CPU; other
    devices keep the scaled copies and never synchronise). Then, for every sample:

    - no overflow: m < 2^60, so the exact norm m* <= m (1 + 3u) + 2^-75 < 2^61 (`pow2_scales`); every
      product, partial sum and Gram entry of x is at most m*^2 (1 + gamma) < 2^123 in magnitude (a
      non-finite sample has m = inf or NaN: not taken);
    - `_ghost`'s proof holds with s = 1: the rows are exact (eps_a = 0; its constant c is computed with
      eps_a > 0, larger than needed) and eta = 2^-149 in absolute units. Its float64 arithmetic neither
      overflows (V, Q, P^2 < T^2 2^250) nor underflows (nonzero Gram entries are multiples of 2^-149 and
      token norms are >= 2c > 2^-75, so every product is 0 or >= 2^-300), so its roundings are relative,
      as in scaled units;
    - tightness: c is absolute here (~1e-19 at these lengths) where the scaled copy makes it relative to
      the sample's size; with m >= 2^-21 (s <= 2^20) it is at most the scaled route's c / s, the constant
      the scaled copies' proof gives in these units: a sample of natural size sees no difference, and
      tiny or zero samples (whose bound would be dominated by c) keep their scaled copy.

    16-bit and float64 data keep the scaled copy (the copy is their cast to the accumulation dtype anyway;
    float64's constants are derived for it), and so do matmuls allowed to round their operands to bf16
    or TF32 (torch's float32 matmul precision below "highest"): a rounded operand below 2^-126 errs by
    more than eta in absolute terms, which the scaled copy keeps far from natural magnitudes."""
    if dt != torch.float32 or m.device.type != "cpu" or m.shape[1] == 0 or matmul_input_roundoff(dt):
        return [False] * len(xs)
    lo, hi = m.aminmax(dim=1)
    ok = [a >= _UNSCALED_NORMS[0] and b < _UNSCALED_NORMS[1] for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
    return [k and x.dtype == torch.float32 for k, x in zip(ok, xs, strict=True)]


def _grams(a: Tensor, g: Tensor) -> Tensor:
    """(b, 2, T, T) float64: X = `_gram`(a) and Y = `_gram`(g) stacked straight into float64 (exact)."""
    X, Y = _gram(a), _gram(g)
    if X.requires_grad or Y.requires_grad:  # out= takes no autograd inputs
        return torch.stack([X, Y], 1).to(F64)
    b, T = X.shape[0], X.shape[1]
    return torch.stack([X, Y], 1, out=torch.empty(b, 2, T, T, dtype=F64, device=X.device))


@functools.lru_cache(maxsize=1024)
def _ghost_consts(T: int, d: int, p: int, dt: torch.dtype, u_in: float) -> tuple[float, ...]:
    """`_ghost`'s constants, folded once per shape and arithmetic: (2c, w_x, w_y, k_p, k_c) for float32
    accumulation, (2c, k_p, k_c) for float64 (see `_ghost` for each)."""
    u, eta = unit_roundoff(dt), underflow_eta(dt)
    gd, gp = _gram_gamma(d, u, u_in), _gram_gamma(p, u, u_in)
    c = 0.0
    for n_, g_ in ((d, gd), (p, gp)):
        e = math.sqrt(n_) * eta
        c = max(c, math.sqrt(n_ * eta) + e / g_ + math.sqrt((e * e + n_ * eta) / g_))
    Tb = _pow2ceil(T)
    gt = gamma(2 * Tb + 1, U64)  # the quadratic forms' two stages (lengths T and 2T) and P (length T)
    r = round_up_factor(4) / (1.0 - gt) ** 2  # Q, P vs their computed values; k_a, k_g's roundings
    ka, kg = round_up_factor(4) / (1.0 - gd), round_up_factor(4) / (1.0 - gp)
    g2 = gamma(Tb * Tb + 1, U64)
    f = round_up_factor(6)  # the (b,) float64 ops and the weights' products (see _ghost)
    kc = ka * kg * r * f
    fe = f / (1.0 - U64)  # err also covers the rounding of value + err (CoveredBound)
    kv = U64 * (1.0 + g2) * (1.0 + gd) * (1.0 + gp)  # u |V| <= kv k_a k_g r P^2
    if dt == F64:
        kp = (gd + gp + 3.0 * gd * gp + g2 * (1.0 + gd) * (1.0 + gp) + kv) * ka * kg * r * fe
        c = max(c, (4.0 * underflow_eta(F64) / kp) ** 0.25)
        return (2.0 * c, kp, kc)
    up = round_up_factor(4)  # the square roots' rounding
    w_x = math.sqrt(gp * kg * r * fe) * up
    w_y = math.sqrt((gd + g2 * (1.0 + gd)) * ka * r * fe) * up
    return (2.0 * c, w_x, w_y, (gd * gp + kv) * ka * kg * r * fe, kc)


def _cross(n: Tensor, w_x: float, w_y: float, matmul: bool | None = None) -> Tensor:
    """(w_x n_g, w_y n_a) (b, 2, T) from n = (n_a, n_g): one product per entry either way. On the CPU one
    float64 matmul W n, W = [[0, w_x], [w_y, 0]] (W's other entry is an exact 0 term); elsewhere a flip and
    two scalar products (W would be a host-to-device copy, which synchronises). ``matmul``: force a route."""
    if n.device.type == "cpu" if matmul is None else matmul:
        return torch.matmul(torch.tensor([[0.0, w_x], [w_y, 0.0]], dtype=F64), n)
    w = n.flip(1)
    w[:, 0].mul_(w_x)
    w[:, 1].mul_(w_y)
    return w


def _ghost_terms(Z: Tensor, n: Tensor, k: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """(V, err, cap) of `_ghost` from the float64 Grams Z (b, 2, T, T) and token norms n (b, 2, T)."""
    b, T = Z.shape[0], Z.shape[2]
    na, ng = n.unbind(1)  # views (unbind/narrow: cheaper to dispatch than indexing)
    P = torch.bmm(na.unsqueeze(1), ng.unsqueeze(2)).view(b)
    X, Y = Z.view(b, 2, T * T).unbind(1)
    V = torch.bmm(X.unsqueeze(1), Y.unsqueeze(2)).view(b)
    if len(k) == 3:  # float64 rows: the cap-shaped error
        return V, P.square().mul_(k[1]), P.square().mul_(k[2])
    w = _cross(n, k[1], k[2])  # (b, 2, T): (w_x n_g, w_y n_a)
    q = torch.bmm(w.view(2 * b, 1, T), Z.abs().view(2 * b, T, T))
    S = torch.bmm(q.view(b, 1, 2 * T), w.view(b, 2 * T, 1)).view(b)  # w_x^2 Q_x + w_y^2 Q_y
    return V, torch.addcmul(S, P, P, value=k[3]), P.square().mul_(k[4])


def _ghost(a: Tensor, g: Tensor) -> Bound:
    """Ghost norm <A A^T, G G^T> of each row block with its bound; a: (b, T, d), g: (b, T, p).

    Rows scaled by powers of two (`pow2_scales`: A = s_a a, G = s_g g, exact up to subnormal entries,
    eps_a = sqrt(d) eta per token), X = A A^T, Y = G G^T by `_gram`, stacked into float64, with
    g_d = `_gram_gamma`(d), a_d = d eta (likewise g_p, a_p). A float32 operand on the CPU whose sample norms
    all lie in [2^-21, 2^60) takes s = 1 (no scaled copy: `_unscaled_ok` proves it). From X's diagonal
    (|X_tt - |A_t|^2| <= g_d |A_t|^2 + a_d), with one constant c for both sides,

        n_t = fl(fl(sqrt(X_tt)) + 2c),   k_a = (1 + 2 gamma_6(2^-53)) / (1 - g_d)

    gives |A_t| + eps_a + c' <= sqrt(k_a) n_t with c' = eps_a / g_d + sqrt((eps_a^2 + a_d) / g_d) (c >=
    sqrt(a_d) + c'; 2c: c's own rounding), hence, for the exact scaled rows a* (x* = a* a*^T):

        |X - x*| <= g_d |A_t||A_s| + a_d + eps_a (|A_t| + |A_s|) + eps_a^2 <= alpha = g_d k_a n_a n_a^T
        |X| <= (1 + g_d) k_a n_a n_a^T,      |a*_t| <= sqrt(k_a) n_a,t

    (likewise beta, Y with g_p, k_g, n_g). XY - x*y* = (X - x*) Y + X (Y - y*) - (X - x*)(Y - y*) and
    the float64 rounding of V = fl(<X, Y>) (<= gamma_{T^2}(2^-53) sum |X||Y|) then give

        |V - <x*, y*>| <= (g_d + gamma_{T^2}(2^-53)(1 + g_d)) k_a Q_y + g_p k_g Q_x + g_d g_p k_a k_g P^2
        n* = <x*, y*> <= k_a k_g P^2      (cap: (sum_t |a*_t||g*_t|)^2)

    with Q_y = n_a^T |Y| n_a, Q_x = n_g^T |X| n_g, P = n_a . n_g: the error weighs each pair by the
    computed |Y_ts| (resp. |X_ts|), up to ~T / sqrt(p) times tighter on natural data than g U with U the
    cap. Both quadratic forms come from one pass: w = W n = (fl(w_x n_g), fl(w_y n_a)) (one float64
    product per entry: W's other entry is 0), S = fl(sum_k w_k^T |Z_k| w_k) (two float64 matmul stages,
    lengths T and 2T, of non-negative terms: >= (1 - gamma_{2T})^2 of its exact value, as P's one stage),
    with w_x^2 >= g_p k_g R, w_y^2 >= (g_d + gamma_{T^2}(1 + g_d)) k_a R, R = r f: r covers S's and P's
    roundings, f = 1 + 2 gamma_8(2^-53) the weights' products and the (b,) ops after (err = fl(S + k_p P P),
    cap = fl(k_c fl(P^2)): at most three roundings each, of non-negative terms), and the square roots'
    rounding a factor 1 + 2 gamma_6 each. So S >= f (g_p k_g Q_x + (g_d + ...) k_a Q_y) and err, cap are
    upper bounds. Products of float32-derived numbers neither under- nor overflow in float64. The result
    is a `CoveredBound`: err also carries u |V| <= u (1 + gamma_{T^2})(1 + g_d)(1 + g_p) k_a k_g P^2 (|V| <=
    (1 + gamma_{T^2}) sum |X||Y|) in its P^2 coefficient, and every coefficient is divided by 1 - u, so
    fl(V + err) >= n* and `certified` needs no final factor.
    Float64 inputs (g_d ~ 1e-13) use the cap-shaped error (g_d + g_p + 3 g_d g_p + gamma_{T^2}(2^-53)
    (1 + g_d)(1 + g_p)) k_a k_g P^2 instead (|Y| <= (1 + g_p) k_g n_g n_g^T), with c large enough that
    the float64 underflow of V's products (T^2 eta64) is below its P^2 (P >= T c^2) term. Finally, on the
    scaled route, everything is divided by (s_a s_g)^2 (exact).

    Ops (T, d, p <= _CHUNK), both operands unscaled: 18: the two float32 sample norms stacked and their
    range (min/max, one host read), two Grams stacked into float64, their diagonal's roots + 2c, five
    float64 matmuls (P, V, W n, the two stages of S), |Z| and three (b,) ops; scaled: ~25 (the scales' bits,
    the scaled copies and the division by (s_a s_g)^2). `Bound.certified` adds three.
    """
    dt = acc_dtype(a, g)
    b, T, d = a.shape
    k = _ghost_consts(T, d, g.shape[2], dt, matmul_input_roundoff(dt))
    m = torch.stack([sample_norms(a, dt), sample_norms(g, dt)])
    keep = _unscaled_ok((a, g), m, dt)
    if all(keep):
        Z = _grams(a, g)
        return CoveredBound(*_ghost_terms(Z, Z.diagonal(dim1=2, dim2=3).sqrt().add_(k[0]), k))
    s = pow2_scales((a, g), dt, m)
    if any(keep):  # the kept operand's Gram is in its stored units: s = 1 for it
        s = torch.where(torch.tensor(keep, device=s.device)[:, None], 1.0, s)
    Z = _grams(*(x if kx else scale_rows(x, sx) for x, sx, kx in zip((a, g), s, keep, strict=True)))
    out = torch.stack(_ghost_terms(Z, Z.diagonal(dim1=2, dim2=3).sqrt().add_(k[0]), k)).div_(unscale_sq(s))
    return CoveredBound(out[0], out[1], out[2])  # divided by powers of two: exact, the cover holds


def _inst(a: Tensor, g: Tensor, keep: Tensor | None = None) -> Bound:
    """Instantiated ||G^T A||_F^2 of each row block with its bound; a: (b, T, d), g: (b, T, p).

    Rows scaled by powers of two (`pow2_scales`), W = sum over chunks c of _CHUNK tokens of fl(G_c^T A_c)
    (one matmul when T <= _CHUNK; else float64 sums). Entrywise |W - G^T A| <= g_all (|G|^T |A|) + T eta,
    g_all = gamma_K + gamma_{T/K}(2^-53)(1 + gamma_K), and || |G|^T |A| ||_F <= S0 = sum_t |A_t||G_t|.
    Scaling's subnormal entries (<= eta each, entries <= M = `max_scaled_entry`) move ||G^T A|| by at
    most delta = 2 eta T sqrt(p d) M. Token norms: float32 (or float64) vector norms t_t of the scaled rows,
    |A_t| + eta sqrt(d) <= k (t_t + e) with k = (1 + 3u) / sqrt(1 - gamma_d) and e >= sqrt(d eta) +
    eta sqrt(d) (squares below eta underflow), e >= 2^-60 (float64: 2^-500) so that no product
    (t_a + e)(t_g + e) underflows; S_c = fl((t_a + e) . (t_g + e)) >= (1 - gamma_T) of its exact value.
    With N = fl(||W||_F) in float64 (relative error gamma_{pd+2}(2^-53)),

        ||g*^T a*|| <= N (1 + gamma_{pd+2}) + g_all k^2 S_c / (1 - gamma_T) + T eta sqrt(p d) + delta

    and n* <= (k^2 S_c / (1 - gamma_T))^2 (cap). The bound is value = that squared, err = 0.

    ``keep`` (k, p, d) bool, k dividing b (block j uses keep[j % k]): the norm of the kept entries
    only, ||keep * G^T A|| (pruning, dpkernels.pruning). Zeroing entries is a projection: it shrinks
    the error term and the exact norm alike, so every bound above holds for the masked norm unchanged.
    """
    dt = acc_dtype(a, g)
    b, T, d = a.shape
    p = g.shape[2]
    u, eta, u_in = unit_roundoff(dt), underflow_eta(dt), matmul_input_roundoff(dt)
    s = pow2_scales((a, g), dt)
    A, G = scale_rows(a, s[0]), scale_rows(g, s[1])
    W = torch.bmm(G[:, :_CHUNK].transpose(1, 2), A[:, :_CHUNK])
    if T > _CHUNK:
        W = W.to(F64)
        for t0 in range(_CHUNK, T, _CHUNK):
            W += torch.bmm(G[:, t0 : t0 + _CHUNK].transpose(1, 2), A[:, t0 : t0 + _CHUNK]).to(F64)
    if keep is not None:
        W = torch.where(keep, W.view(-1, *keep.shape), 0.0).view(W.shape)
    N = sample_norms(W, F64)
    g_dot = dot_gamma(min(T, _CHUNK), u, u_in)
    g_all = g_dot + gamma(max(1, math.ceil(T / _CHUNK)), U64) * (1.0 + g_dot)
    e = max(math.sqrt(max(d, p) * eta) + eta * math.sqrt(max(d, p)), 2.0**-60 if dt != F64 else 2.0**-500)
    k2 = (1.0 + 3.0 * u) ** 2 / (1.0 - gamma(max(d, p) + 1, u)) / (1.0 - dot_gamma(T, u, u_in))  # k^2 / (1 - gamma_T)
    S = torch.bmm(
        torch.linalg.vector_norm(A, dim=-1).add_(e)[:, None, :], torch.linalg.vector_norm(G, dim=-1).add_(e)[:, :, None]
    ).view(b)  # a float32 matmul when dt is: TF32 operands allowed (dot_gamma with u_in)
    f = round_up_factor(8)
    # W's underflow, scaling's subnormals (delta), and float64 squares of a float64 W that underflow
    absn = (T * eta * math.sqrt(p * d) * (1.0 + 2.0 * max_scaled_entry(dt)) + math.sqrt(p * d * underflow_eta(F64))) * f
    up = torch.add(N * ((1.0 + gamma(p * d + 2, U64)) * f), S, alpha=g_all * k2 * f).add_(absn)
    cap = S.to(F64).square_().mul_(k2 * k2 * f)
    up = up.square_().mul_(f)
    out = torch.stack([up, cap]).div_(unscale_sq(s))
    return CoveredBound(out[0], torch.zeros_like(out[0]), out[1])  # err = 0: value + 0 is exact


def linear_norms_bound(a: Tensor, g: Tensor, *, bias: bool, method: str) -> tuple[Bound, Bound | None]:
    """Bounds of the per-sample squared norms of linear_norms (weight by ``method``, bias); see _ghost,
    _inst and bias_norms_bound. a: (B, T, d), g: (B, T, p)."""
    if method not in ("ghost", "inst"):
        raise ValueError(f"linear_norms: method must be 'ghost' or 'inst', got {method!r}")
    B, T, d = a.shape
    p = g.shape[-1]
    if T == 1 and acc_dtype(a, g) != F64:
        return _one_token(a, g), (bias_norms_bound(g) if bias else None)
    per_sample = 4 * T * T if method == "ghost" else 2 * p * d + T * (d + p)
    fn = _ghost if method == "ghost" else _inst
    parts = [fn(a[sl], g[sl]) for sl in _chunks(B, per_sample)]
    return _cat(parts, a), (bias_norms_bound(g) if bias else None)


def _cat(parts: list[Bound], x: Tensor) -> Bound:
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return _empty(x)
    kind = CoveredBound if all(isinstance(b, CoveredBound) for b in parts) else Bound  # entrywise: kept
    return kind(*(torch.cat([getattr(b, f) for b in parts]) for f in Bound._fields))


def _one_token(a: Tensor, g: Tensor) -> Bound:
    """One token per sample (a Linear on vectors: MLPs, a CNN's head): the exact squared norm is
    |g_1 a_1^T|_F^2 = |a_1|^2 |g_1|^2, bounded by the product of the float64 token norms (`token_norms`:
    upper bounds, no overflow or underflow for float32 and 16-bit values): no Gram, no matmul, and
    tight to float64 rounding, so it is both the value and the cap."""
    up = (token_norms(a[:, 0]) * token_norms(g[:, 0], round_up_factor(4))).square_()
    return CoveredBound(up, torch.zeros_like(up), up)


def _empty(x: Tensor) -> Bound:
    z = torch.zeros(x.shape[0], device=x.device, dtype=F64)
    return CoveredBound(z, z, z)


@functools.lru_cache(maxsize=1024)
def _sum_consts(T: int, m: int, f64: bool, n_sq: int) -> tuple[float, float, float]:
    """`_sum_bound`'s constants (k_e k_c, k_c, the float64 squares' underflow), folded once per shape."""
    gT = gamma(T + 1, U64)
    gv = gamma(n_sq + 2, U64)
    kF = ((1.0 + gamma(T * m + 2, U64)) / (1.0 - U64)) ** 2 * (2.0 if f64 else 1.0)
    kc = T * kF * round_up_factor(4)
    ke = (gT + gv + gT * gv) * (1.0 + gv) * (1.0 + gT) ** 2 + (gT + gT * gT) * (2.0 if f64 else 1.0)
    e64 = 2.0 * n_sq * underflow_eta(F64)
    # CoveredBound: 0 <= value <= (1 + g_v)(1 + gamma_T)^2 k_c F^2 (+ the float64 squares' underflow)
    return cover_coef(ke * kc, (1.0 + gv) * (1.0 + gT) ** 2 * kc), kc, cover_coef(e64, e64)


def _sum_bound(value: Tensor, F: Tensor, T: int, m: int, f64: bool, n_sq: int) -> Bound:
    """Bound of n* = sum_j ||v*_j||^2, v*_j the exact sums over disjoint groups of the T rows x*_t (m
    entries each), from float64 sums v_j (a dot product or sum of length <= T per entry: |v_j - v*_j|
    <= gamma_T(2^-53) sum_{t in j} |x*_t| + T tau, entrywise; tau = eta64 for float64 inputs, else 0),
    value = fl(sum_j ||v_j||^2) (n_sq squares: <= (1 + g_v) times the exact sum of squares) and
    F = fl(||x||_F) in float64 (x: the stored rows), so that ||x*||^2 <= k_F F^2.

    With b_j = ||v_j - v*_j||: sum_j b_j^2 <= (sum_j b_j)^2 <= (gamma_T sum_t |x*_t| + T tau sqrt(m))^2
    <= gamma_T^2 T ||x*||^2 (Cauchy-Schwarz; tau = 0), and for any theta > 0

        n* <= sum_j (||v_j|| + b_j)^2 <= (1 + theta) sum_j ||v_j||^2 + (1 + 1 / theta) sum_j b_j^2.

    sum_j ||v_j||^2 <= (1 + g_v) value and value <= (1 + g_v)(1 + gamma_T)^2 T k_F F^2 (the triangle
    inequality), so with theta = gamma_T

        n* <= value + ((gamma_T + g_v + gamma_T g_v)(1 + g_v)(1 + gamma_T)^2 + gamma_T + gamma_T^2) T k_F F^2

    (err ~ (2 gamma_T + g_v) T F^2: ~1e-13 relative at T = 256, m = 768 on natural data). Cap:
    n* <= (sum_t |x*_t|)^2 <= T ||x*||_F^2. Float32 and 16-bit inputs: x* = x, nothing under- or
    overflows in float64 (sums of float32 values are multiples of 2^-149), k_F = ((1 + gamma_{Tm+2}) /
    (1 - u))^2; float64 inputs: ||x*|| <= F (1 + gamma_{Tm+2}) / (1 - u) + sqrt(T m) eta64 (products and
    squares that underflow; (x + y)^2 <= 2 x^2 + 2 y^2 doubles k_F), every square of `value` may lose
    eta64 and sum_j b_j^2 doubles with tau; terms of order eta64^2 are below float64's range and concern
    only samples whose exact squared norm is below 2^-1074 anyway.

    A `CoveredBound`: err's coefficients also carry u value <= u (1 + g_v)(1 + gamma_T)^2 k_c F^2 (and the
    squares' float64 underflow) and are divided by 1 - u (`cover_coef`).

    Three (b,) ops: F^2, err = k_e F^2, cap = k_c F^2 (four for float64 inputs); any shape of value and F
    (the weight's and bias's sums of a norm layer come stacked)."""
    kek, kc, e_add = _sum_consts(T, m, f64, n_sq)
    F2 = F.square()
    err = F2 * kek
    cap = F2.mul_(kc)
    if f64:
        err = err.add_(e_add)
    return CoveredBound(value, err, cap)


def _dot_rows(v: Tensor) -> Tensor:
    """fl(||v_i||^2) per row of a float64 (B, m) tensor, one batched dot."""
    return torch.bmm(v[:, None, :], v[:, :, None]).view(-1)


def bias_norms_bound(g: Tensor) -> Bound:
    """Bound of ||sum_t g_t||^2 per sample, g: (B, T, p); the sum in float64 (see _sum_bound)."""
    B, T, p = g.shape
    if B == 0 or T == 0 or p == 0:
        return _empty(g)
    v = g.sum(dim=1, dtype=F64)
    return _sum_bound(_dot_rows(v), sample_norms(g, F64), T, p, g.dtype == F64, p)


def conv_norms_bound(
    x: Tensor, g: Tensor, *, kernel_size, stride, padding, dilation, groups: int, bias: bool, method: str
) -> tuple[Bound, Bound | None]:
    """Bounds of conv_norms: the Linear bounds of each (sample, group) row block of the unfolded input,
    summed over groups (squared norms of disjoint blocks add, and so do their bounds: `Bound.group_sum`)."""
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
        parts.append(wb if groups == 1 else wb.group_sum(groups))
    return _cat(parts, x), (bias_norms_bound(g.flatten(2).transpose(1, 2)) if bias else None)


def embedding_norms_bound(ids: Tensor, g: Tensor, *, num_embeddings: int, padding_idx: int | None) -> Bound:
    """Bound of embedding_norms: rows summed per (sample, id) in float64 (index_add), then squared and
    summed per sample; padding rows excluded (set to 0: where, so a non-finite one does not count).
    See _sum_bound (groups: the ids; at most T of them per sample)."""
    B = ids.shape[0]
    if ids.numel() == 0 or B == 0:
        return _empty(g.reshape(B, -1))
    D = g.shape[-1]
    T = ids.shape[1]
    rows = g.reshape(*ids.shape, D)
    keep = _pad_mask(ids, padding_idx, num_embeddings)
    if keep is not None:
        rows = torch.where(keep[..., None], rows, 0)
    rows = rows.to(F64)
    keys = (torch.arange(B, device=ids.device)[:, None] * num_embeddings + ids).reshape(-1)
    inv, key_of = group_keys(keys)
    summed = torch.zeros(keys.numel(), D, device=g.device, dtype=F64).index_add_(0, inv, rows.reshape(-1, D))
    sample = key_of.div(num_embeddings, rounding_mode="floor").clamp_(min=0)  # unused groups: zero rows
    value = torch.zeros(B, device=g.device, dtype=F64).index_add_(0, sample, _dot_rows(summed))
    return _sum_bound(value, sample_norms(rows, F64), T, D, g.dtype == F64, T * D)


def embedding_linear_cross_bound(ids: Tensor, g_e: Tensor, a: Tensor, g_h: Tensor, *, padding_idx: int | None) -> Bound:
    """Bound of the cross term <dE_i, dH_i> of embedding_linear_cross (signed: |X - value| <= err;
    cap inf, the caller caps the tied total by (|dE| + |dH|)^2).

    With P[s, t] = g_h[s, x_t] (scaled per sample by a power of two, as are a and, for float64, g_e),
    M = fl(P^T A) in the accumulation dtype (length Th dots) and X = sum_t g_e,t . M_t in float64:
    |M - P^T A| <= gamma_Th |P|^T |A| + Th eta, so
    |X - exact| <= gamma_Th sum_{t,s} |P_st| |a_s| |g_e,t| + Th eta sqrt(D) sum_t |g_e,t|
                  + gamma_{Te D}(2^-53) sum |M| |g_e| + (scaling: eta (sum_s |a_s|)(sum_t |g_e,t|)(1 + sqrt(D) Th)).
    Token norms of float64 g_e (scaled) may lose sqrt(D eta64) to underflowing squares: added.
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
        s = pow2_scales((P, a[sl]), dt)
        Ps, As = scale_rows(P, s[0]), scale_rows(a[sl], s[1])
        s64 = s.to(F64)
        if ge.dtype == F64:
            se = pow2_scales((ge,), F64)[0]
            Ge, eta64 = scale_rows(ge, se), underflow_eta(F64)
            ne = token_norms(Ge).add_(math.sqrt(D * eta64) * 2.0)
            s64 = s64[0] * s64[1] * se
        else:
            Ge, eta64 = ge.to(F64), 0.0
            ne = token_norms(Ge)
            s64 = s64[0] * s64[1]
        M = (Ps.transpose(1, 2) @ As).to(F64)  # (b, Te, D)
        prod = M * Ge
        value = prod.sum(dim=(1, 2))
        na = token_norms(As) if dt != F64 else token_norms(As).add_(math.sqrt(D * eta) * 2.0)
        q = (na[:, None, :] @ Ps.to(F64).abs() @ ne[:, :, None]).flatten()
        sum_ne, sum_na = ne.sum(dim=1), na.sum(dim=1)
        err = dot_gamma(Th, u, u_in) * q + Th * eta * math.sqrt(D) * sum_ne
        err = err + gamma(Te * D + 1, U64) * prod.abs().sum(dim=(1, 2))
        err = err + 2.0 * max(eta, eta64) * sum_na * sum_ne * (1.0 + math.sqrt(D) * Th)
        err = err * round_up_factor(Th * Te + Te * D + Th + Te + 8)
        vals.append(value / s64)
        errs.append(err / s64)
    return Bound(torch.cat(vals), torch.cat(errs), inf)


def affine_norms_bound(xhat: Tensor, g: Tensor, *, weight: bool, bias: bool) -> tuple[Bound | None, Bound | None]:
    """Bounds of affine_norms: ||sum_t xhat_t * g_t||^2 and ||sum_t g_t||^2 per sample, xhat, g: (B, T, C).

    The weight's rows x*_t = xhat_t * g_t are formed in float64 (exact for float32 and 16-bit inputs;
    float64 inputs round each product: relative u, absolute eta64, which the dot-product model of
    _sum_bound covers: v_k = sum_t xhat_tk g_tk is a length-T dot product); see _sum_bound. With both
    asked (and xhat, g of one dtype: the two bounds' constants are then the same), the two row sets are
    stacked (B, 2, T, C) and summed, squared and bounded together: 9 ops, was 14."""
    w = b = None
    B, T, C = g.shape
    if weight and bias and B and T and C and xhat.dtype == g.dtype:  # one stacked float64 pass for both
        R = torch.stack([xhat.to(F64) * g, g], 1)  # (B, 2, T, C): rows x_t = xhat_t * g_t, then g_t
        v = R.sum(dim=2)
        value = torch.bmm(v.view(2 * B, 1, C), v.view(2 * B, C, 1)).view(B, 2)
        wb = _sum_bound(value, torch.linalg.vector_norm(R, dim=(2, 3)), T, C, g.dtype == F64, C)
        return CoveredBound(*(t[:, 0] for t in wb)), CoveredBound(*(t[:, 1] for t in wb))
    if weight:
        if B == 0 or T == 0 or C == 0:
            w = _empty(g)
        else:
            P = xhat.to(F64) * g
            w = _sum_bound(_dot_rows(P.sum(dim=1)), sample_norms(P, F64), T, C, F64 in (xhat.dtype, g.dtype), C)
    if bias:
        b = bias_norms_bound(g)
    return w, b
