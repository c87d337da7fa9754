"""Certified per-sample squared norms: rigorous floating-point error bounds, backend-independent parts.

A norm op computes n_i = ||g_i||^2 of sample i's gradient g_i in floating point. A DP adversary picks
the samples, and can make the computed value arbitrarily wrong: two tokens a and a + delta with output
gradients w and -w give a ghost norm <A A^T, G G^T> whose float32 value is a difference of two nearly
equal large numbers (negative, or far below the truth). Clipping by an under-stated norm breaks the
sensitivity bound. So every norm the engine clips by is *certified*: an upper bound on the exact
||g_i||^2 of the stored tensors (A, G), proven with the standard model of floating-point arithmetic
(Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., ch. 2-3):

    fl(x op y) = (x op y)(1 + delta) + eta,   |delta| <= u,   |eta| <= eta_min (underflow, products only)

and for a dot product of length n, in any summation order,

    |fl(x . y) - x . y| <= gamma_n sum_k |x_k y_k| + n eta_min,      gamma_n = n u / (1 - n u).

Operands first rounded to a narrower format with unit roundoff u_in (TF32 or bf16 tensor cores fed
float32) add (1 + u_in)^2 - 1 to the relative part (`dot_gamma`).

A `Bound` (value, err, cap) of a sample's squared norm n says n <= value + err and n <= cap; its
`certified()` is min(value + err, cap) (fmin: a NaN raw value on finite data falls back to the cap),
never negative, rounded up: three (B,) ops. The cap is the triangle-inequality
bound from per-token norms, ||sum_t g_t a_t^T|| <= sum_t |a_t| |g_t|, so a certified norm is never
above it, whatever the rounding. All of it is float64: a product of two float32 numbers is exact there,
and a sum of N float64 terms errs by at most gamma_N(2^-53) of their absolute sum, far below float32's
rounding; float64 also holds (1e18)^4-sized squared norms of float32 data without overflow.

Backends: the reference computes tight bounds next to its norms (dpkernels/ops/reference/bounds.py:
each *_bound op gives the formula and its proof). A backend without its own *_bound ops is certified
here from its raw squared norm r and its declared arithmetic (`generic_bound`):

    n <= min(cap, r + kappa * cap + abs_err),   kappa = dot_gamma(N, u_in, u_acc)

with N at least the total length of every chain of roundings the op performs (any op whose exact
result is a sum over at most N rounded products of terms bounded in sum by the cap: see generic_bound).
It is rigorous but loose: on natural data cap / n grows like T, so a Triton norm may be inflated by a
large factor (a smaller clip factor: utility, never privacy). Tight bounds inside the kernels are the
way to remove that.

Cost: the bookkeeping is a few (B,) float64 ops per bound with every constant folded into one
coefficient (no per-term (B,) vectors), the scales come from the exponent bits of one float32 norm
per tensor (`pow2_scales`: four integer ops for both operands), and a non-finite input propagates
through the arithmetic itself (no isfinite/where). Nothing here synchronises with the host; the
reference ghost bound reads two numbers back on the CPU only (its unscaled route).
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
from torch import Tensor

U64 = 2.0**-53
F64 = torch.float64
_TINY = struct.unpack("<d", (1).to_bytes(8, "little"))[0]  # the smallest subnormal double, from its bits


def workers_flush(threads: int) -> Tensor:
    """0-d bool: some of torch's CPU intra-op threads flush subnormals (a subnormal float32 product spread
    over ``threads`` workers, more than torch's grain size each). No host read: the caller reads it."""
    with torch.no_grad():
        return (torch.full((max(1, threads) * (1 << 16),), 2.0**-140) * 2.0 == 0).any()


def check_gradual_underflow(threads: bool = False) -> None:
    """Refuse flush-to-zero / denormals-are-zero CPU arithmetic (``torch.set_flush_denormal(True)``, or the
    MXCSR / FPCR bits set by another library): the model above has gradual underflow (eta_min the smallest
    subnormal); flushing makes a product's absolute error up to the smallest normal, and an input read as
    0 loses all of its terms (certified 0x the exact norm for a sample with a subnormal activation, 0.5x for
    flushed Gram products). Probes the calling thread (a Python float product, which uses the same SSE /
    FPCR state: ~60 ns, so every certified bound checks) and, with ``threads``, torch's intra-op threads
    (`workers_flush`; they inherit the state of the thread that created them, which a later
    ``set_flush_denormal(False)`` does not change; the engine reads that flag with a backward pass's one
    host read instead)."""
    if _TINY * 2.0 == 0.0 or (threads and bool(workers_flush(torch.get_num_threads()))):
        raise RuntimeError(
            "flush-to-zero / denormals-are-zero arithmetic is on (torch.set_flush_denormal(True), or a library "
            "that set the CPU's floating-point control bits): dpkernels' certified per-sample norms assume IEEE "
            "gradual underflow, and flushing can make a norm 0 or half the true one, so a sample could exceed the "
            "clipping bound. Call torch.set_flush_denormal(False) before training (if torch's worker threads were "
            "started with it on, in a fresh process)"
        )


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of an accumulation dtype: 2^-53 (float64), 2^-24 (float32)."""
    return U64 if dtype == torch.float64 else 2.0**-24


def underflow_eta(dtype: torch.dtype) -> float:
    """The absolute error one underflowing product can make (the smallest subnormal; generous by 2x)."""
    return 2.0**-1074 if dtype == torch.float64 else 2.0**-149


def gamma(n: float, u: float) -> float:
    """gamma_n = n u / (1 - n u); inf when n u >= 1/2 (no useful bound: the caps take over)."""
    nu = float(n) * u
    return nu / (1.0 - nu) if nu < 0.5 else math.inf


def dot_gamma(n: float, u_acc: float, u_in: float = 0.0) -> float:
    """Relative error bound of a length-n dot product whose operands are first rounded with u_in and
    whose products and sums are rounded with u_acc: (1 + u_in)^2 (1 + gamma_n) - 1."""
    return (1.0 + u_in) ** 2 * (1.0 + gamma(n + 1, u_acc)) - 1.0


def fp32_matmul_reduced() -> bool:
    """Whether torch's float32 matmuls may round their operands (to TF32 or bf16): the legacy setting
    (torch.get_float32_matmul_precision() below "highest"), or the per-backend one (torch.backends.
    fp32_precision, .cuda/.mkldnn(.matmul).fp32_precision: anything but "ieee"/"none" anywhere in the
    chain), under which the legacy getter raises instead of answering."""
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        pass
    chain: list[object] = [torch.backends]
    for name in ("cuda", "mkldnn"):
        b = getattr(torch.backends, name, None)
        chain += [b, getattr(b, "matmul", None)]
    return any(getattr(b, "fp32_precision", "none") not in ("ieee", "none") for b in chain if b is not None)


def matmul_input_roundoff(dtype: torch.dtype) -> float:
    """u_in of torch's own matmuls on float32 operands: 0 (IEEE float32) unless `fp32_matmul_reduced`,
    else 2^-7 (bf16 operands, rounded or truncated, which also covers TF32): "high"/"medium" (or a
    backend's "tf32"/"bf16") let cuBLAS / oneDNN round the operands. 0 for other dtypes."""
    if dtype == torch.float32 and fp32_matmul_reduced():
        return 2.0**-7
    return 0.0


def round_up_factor(n_ops: float) -> float:
    """A factor that covers n_ops float64 roundings of a non-negative result (with a 2x margin)."""
    return 1.0 + 2.0 * gamma(n_ops + 2, U64)


def signed_sum(value: Tensor, err: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(value, err) of the sums along ``dim`` of G quantities bounded by value + err each, the values signed:
    their float64 sum errs by at most gamma_{G-1}(2^-53) sum |value|, which err takes on, and the err sum is
    rounded up. f = round_up_factor(G + 4) covers it all: f - 1 = 2 gamma_{G+6} exceeds gamma_{G-1} with the
    roundings of |value|'s sum, and f the err sum's and the final ones."""
    f = round_up_factor(value.shape[dim] + 4)
    return value.sum(dim), (err.sum(dim) + value.abs().sum(dim) * (f - 1.0)) * f


class Bound(NamedTuple):
    """Upper bounds on a (B,) exact quantity n: n <= value + err and n <= cap (float64 each).

    For a squared norm the cap is the per-token (triangle inequality) bound; for the signed cross term
    of a tied table, |n - value| <= err and |n| <= cap.

    Every producer keeps two invariants that `certified` relies on: value + err >= n >= 0 for a squared
    norm (so its rounded sum is >= 0: rounding is monotone), and a non-finite input makes both value + err
    and cap non-finite (each of them carries a term that every input entry reaches, with a positive
    coefficient), while finite inputs give a finite cap."""

    value: Tensor
    err: Tensor
    cap: Tensor

    def plus(self, other: Bound) -> Bound:
        """The bound of a sum of two quantities (squared norms of disjoint blocks add); see `group_sum`."""
        return Bound(*(torch.stack([a, b]) for a, b in zip(self, other, strict=True))).group_sum(2, dim=0)

    def group_sum(self, groups: int, dim: int = 1) -> Bound:
        """The bound of sums over ``groups`` quantities: the fields viewed as (-1, groups) and summed (dim=1),
        or given stacked with the groups along ``dim``: the values and errs by `signed_sum`, the non-negative
        caps rounded up by the same factor."""
        v, e, c = (t if dim == 0 else t.reshape(-1, groups) for t in self)
        d = 0 if dim == 0 else 1
        return Bound(*signed_sum(v, e, d), c.sum(d) * round_up_factor(groups + 4))

    def certified(self) -> Tensor:
        """min(value + err, cap), rounded up: an upper bound on n, float64 (B,), never negative.

        fmin: a value + err that is NaN on finite inputs (a backend's raw norm that overflowed float32)
        falls back to the cap; a non-finite input makes both non-finite (class invariant), so the result
        is non-finite, for the engine's FloatingPointError. The two roundings (the sum and the product)
        are covered by the factor; the min is exact."""
        return torch.fmin(self.value + self.err, self.cap) * round_up_factor(4)


class CoveredBound(Bound):
    """A `Bound` whose err also covers the float64 rounding of value + err, so that fl(value + err) >= n
    and `certified` needs no final factor: fmin(fl(value + err), cap), two ops instead of three.

    Its producer makes err >= (e0 + u |value|) / (1 - u), with e0 its own bound (value + e0 >= n >= 0) and
    u |value| bounded from its own terms (`cover_coef`). Then value + err >= 0, and fl(value + err) >=
    (value + err)(1 - u) >= value - u |value| + e0 + u |value| >= n (a sum that lands among the subnormals
    is exact). Bounds with err = 0 whose value already is an upper bound (the instantiated and one-token
    norms) qualify as they are. Sums and other combinations of bounds (`plus`, `group_sum`, scaling
    by a non-power of two) build a plain `Bound`, whose `certified` rounds up."""

    __slots__ = ()

    def certified(self) -> Tensor:
        """min(value + err, cap): an upper bound on n, float64 (B,), never negative (see the class)."""
        return torch.fmin(self.value + self.err, self.cap)


def cover_coef(k_err: float, k_abs: float) -> float:
    """The coefficient of a `CoveredBound`'s err term q, whose own bound is e0 = k_err q, given |value| <=
    k_abs q (q >= 0, computed by the producer): (k_err + u k_abs) / (1 - u), with two more float64
    roundings of err (its product and sum) covered."""
    return (k_err + U64 * k_abs) / (1.0 - U64) * round_up_factor(2)


def _norm_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def sample_norms(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(B,) computed 2-norms of each sample of x, accumulated in ``dtype`` (float32 or float64):
    fl(sqrt(sum of rounded squares)), in any order (ATen's vector_norm on CPU and CUDA)."""
    return torch.linalg.vector_norm(x, dim=_norm_dims(x), dtype=None if x.dtype == dtype else dtype)


# float32 / float64 bit layout: (int view, exponent mask, (2 bias - 1) << mantissa bits, mantissa bits, bias)
_BITS = {
    torch.float32: (torch.int32, 0x7F800000, 253 << 23, 23, 127),
    torch.float64: (torch.int64, 0x7FF0000000000000, 2045 << 52, 52, 1023),
}
# |log2| of the largest and smallest scale: 2^±100 (float32) keeps (s a)(s a)^T and s^4 in range for every
# finite input (see pow2_scales); 2^±250 (float64) keeps (s_a s_g)^2 within float64's normal range.
SCALE_LOG2 = {torch.float32: 100, torch.float64: 250}


def max_scaled_entry(dtype: torch.dtype) -> float:
    """A bound on every |s_i x| entry after `pow2_scales` (finite x): 2^28 (float32), 2^774 (float64)."""
    return 2.0**28 if dtype == torch.float32 else 2.0**774


def pow2_scales(xs: tuple[Tensor, ...], dtype: torch.dtype, m: Tensor | None = None) -> Tensor:
    """(len(xs), B) powers of two s in ``dtype`` with s_i m_i in [1/2, 1) for the computed sample norms
    m_i = `sample_norms` (x_i) (or ``m``, the caller's stacked `sample_norms` of xs), clamped to
    [2^-K, 2^K] (K = SCALE_LOG2[dtype]; also where m_i is 0, subnormal or not finite). Built from m's
    exponent bits, the same on every device:

        s = 2^(2 bias - 1 - E) for m = 1.f 2^(E - bias):  bits(s) = ((2 bias - 1) << M) - (bits(m) & expmask)

    Scaling a sample's rows by s_i is exact (a power of two) except where a scaled-down entry becomes
    subnormal (error <= eta per entry). Range (float32): the computed sum of rounded squares is at least
    each of its terms (rounding is monotone), so |x_k| <= m (1 + 3u) + 2^-75 for finite m; hence
    |s x_k| <= 1 + 2^25 when s is not clamped or clamped at 2^100 (m < 2^-100), and |s x_k| < 2^128 2^-100
    when clamped at 2^-100 (m >= 2^100 or inf): every scaled entry is below 2^28 (`max_scaled_entry`), so
    Grams of rows up to 2^60 long stay finite, while a sample of natural size keeps its scale near 1
    (products far above underflow). float64: the same with 2^±250 (entries of norm-representable data)."""
    ity, mask, c, mant, bias = _BITS[dtype]
    k = SCALE_LOG2[dtype]
    if m is None:
        m = torch.stack([sample_norms(x, dtype) for x in xs])
    return (c - m.view(ity).bitwise_and(mask)).clamp_((bias - k) << mant, (bias + k) << mant).view(dtype)


def scale_rows(x: Tensor, s: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """x (B, ...) times s_i per sample: s (B,) in the accumulation dtype, which the product takes (one op,
    16-bit x included), or both cast to ``dtype`` first."""
    if dtype is not None:
        x, s = x.to(dtype), s.to(dtype)
    return x * s.view(-1, *([1] * (x.dim() - 1)))


def pow2_scale(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(B,) float64 powers of two s_i with max|s_i x_i| in [1/2, 1) (1 where x_i is zero or not finite),
    clamped to dtype's normal range so that s_i itself is representable in ``dtype`` (one sample's own
    scale from its largest entry; the norms' bounds use the cheaper `pow2_scales`)."""
    B = x.shape[0]
    if x.numel() == 0:
        return torch.ones(B, device=x.device, dtype=F64)
    m = torch.linalg.vector_norm(x.detach(), ord=math.inf, dim=_norm_dims(x)).to(F64)
    _, e = torch.frexp(m)
    e = torch.where(torch.isfinite(m), e, torch.zeros_like(e))
    emax = 1021 if dtype == torch.float64 else 125
    return torch.ldexp(torch.ones_like(m), (-e).clamp(-emax, emax))


def from_norm_error(value: Tensor, rel: float, abs_norm: Tensor, cap_norm: Tensor) -> Bound:
    """The Bound of n = ||v||^2 when value = fl(||v'||^2) with relative error <= rel (a sum of squares)
    and ||v - v'|| <= abs_norm, ||v|| <= cap_norm: n <= (sqrt(value (1 + rel)) + abs_norm)^2."""
    f = round_up_factor(8)
    up = ((value * (1.0 + rel)).sqrt() * f + abs_norm) * f
    return Bound(value, (up * up * f - value).clamp_min(0.0), cap_norm * cap_norm * f)


def unscale_sq(s: Tensor) -> Tensor:
    """(s_a s_g)^2, float64 (B,), from the (2, B) scales: exact (powers of two within float64's range)."""
    s64 = s.to(F64)
    return (s64[0] * s64[1]).square()


def token_norms(x: Tensor, up: float = 1.0) -> Tensor:
    """(B, T) float64 upper bounds on the 2-norms of x's last-dim rows (x: (B, T, d), float32 or 16-bit).

    float64 squares and sums of float32/16-bit values: relative error <= gamma_{d+2}(2^-53), covered
    by the factor; no overflow or underflow for those dtypes."""
    d = x.shape[-1]
    return torch.linalg.vector_norm(x, dim=-1, dtype=F64) * (round_up_factor(d + 4) * up)


# ----------------------------------------------------------------------------- backends without bounds


def backend_arithmetic(dtype: torch.dtype) -> tuple[float, float]:
    """(u_acc, u_in) of a backend kernel that accumulates in acc_dtype and may feed float32 operands to
    TF32 tensor cores (the Triton kernels do when `fp32_matmul_reduced`, legacy or per-backend setting)."""
    u_in = 2.0**-10 if dtype == torch.float32 and fp32_matmul_reduced() else 0.0
    return unit_roundoff(torch.float64 if dtype == torch.float64 else torch.float32), u_in


def generic_bound(
    raw: Tensor, cap_norm: Tensor, abs_scale: Tensor, n_chain: float, n_abs: float, dtype: torch.dtype
) -> Bound:
    """Certify a backend's raw squared norm r of n = ||v||^2, v = sum_t x_t (x) y_t (outer or elementwise
    products per token, any grouping), from the per-token cap ||v|| <= C = sum_t |x_t||y_t| (cap_norm: an
    upper bound on C):

        n <= min(C^2, r + kappa C^2 + 4 eta n_abs (1 + abs_scale)),    kappa = dot_gamma(n_chain, u_acc, u_in)

    Proof sketch: such an op (ghost <X, Y> with Grams of length d and p and a T^2 reduction;
    instantiation with length-T dots and a p d sum of squares; sums over T then a sum of squares) forms
    r through chains of at most n_chain rounded operations, and the absolute values of the exact terms
    of every sum along them add up to at most C^2 (sum_{t,s} |x_t||x_s||y_t||y_s| = C^2; a sum of squares
    of entrywise |.|-sums is <= C^2), so |r - n| <= kappa C^2. Underflow adds at most eta per product,
    over at most n_abs products, each weighted by at most 1 + abs_scale (the caller's bound on the
    magnitudes, e.g. (sum_t |x_t|)^2 + (sum_t |y_t|)^2). A non-finite r on finite data (float32
    overflow in the raw op: +-inf or NaN) is read as +inf, so `Bound.certified` falls back to the cap; the
    err carries kappa C^2, so a non-finite input (a non-finite cap) leaves value + err non-finite as well.
    The float64 roundings here (square, two products, two sums) are covered by the factors."""
    u_acc, u_in = backend_arithmetic(dtype)
    f = round_up_factor(8)
    cap = cap_norm.square() * f
    k_abs = 4.0 * underflow_eta(dtype) * n_abs * f
    err = torch.add(cap * (dot_gamma(n_chain, u_acc, u_in) * f), abs_scale, alpha=k_abs).add_(k_abs)
    return Bound(torch.nan_to_num(raw.to(F64), nan=math.inf, neginf=math.inf), err, cap)
