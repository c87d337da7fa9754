"""Per-sample squared gradient norms of a Linear layer, without per-sample gradients.

    ghost:  ||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T> = sum_{t,s} (a_t . a_s)(g_t . g_s)
    inst:   ||G_i^T A_i||_F^2 = sum_{p,d} (sum_t g_tp a_td)^2
    bias:   ||sum_t g_t||^2   = sum_{t,s} g_t . g_s

(Li et al. 2021, "Large language models can be strong differentially private learners",
for the ghost norm; Bu et al. 2023 for choosing per layer.) a: (B, T, d), g: (B, T, p).

ghost: one program per (sample, pair of T-tiles (I, J) with I <= J). It forms the
(BLOCK_T x BLOCK_T) tiles A_I A_J^T and G_I G_J^T in registers, multiplies them
elementwise and sums: no T x T matrix reaches memory, and by Gram symmetry only the tiles
on or above the diagonal are computed, off-diagonal ones counted twice. The same G Gram
tiles give the bias norm for free (the sum of all entries of G_i G_i^T).

inst: one program per (sample, p-tile, d-tile) forms that tile of G_i^T A_i (a T
reduction) in registers, squares and sums it; the per-sample gradient is never written.
The programs of the first d-tile also sum their G tiles over T for the bias norm.

The conv kernels (conv.py) are these with A gathered from the input: they share the device
functions below. Each program writes one partial sum; the host sums a sample's partials in a
fixed order, so results are deterministic (no atomics). Accumulation in float32, float64 for
float64.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..bounds import U64, Bound, backend_arithmetic, dot_gamma, from_norm_error, gamma, round_up_factor
from ..reference import bounds as _ref_bounds
from ._common import (
    acc_dtype,
    acc_tl,
    block,
    cast_inputs,
    common_input,
    dot_operand,
    dot_precision,
    ghost_pairs,
    gram_tile_config,
    k_block,
    launch,
    load_exact,
    matmul_config,
    output,
    per_sample,
    register_op,
    tile_ranges,
)
from .affine import _channel_sums, sum_bound, tight

# ----------------------------------------------------------------------------- device functions


@triton.jit
def _upper_pair(k, n_tiles, T, BLOCK_T: tl.constexpr):
    """The pair of T-tiles (i, j), i <= j, that is the k-th cell of the row-major upper triangle of
    n_tiles x n_tiles, and the two tiles' rows and masks. Row i starts at S(i) = i (2 n - i + 1) / 2, so
    i = floor(((2n+1) - sqrt((2n+1)^2 - 8k)) / 2), computed in float64 and corrected by one step either
    way against rounding (n_tiles < 23170: (2 n_tiles + 1)^2 fits int32)."""
    n2 = 2 * n_tiles + 1
    i = ((n2 - tl.sqrt((n2 * n2 - 8 * k).to(tl.float64))) * 0.5).to(tl.int32)
    i = tl.where(i * (n2 - i) // 2 > k, i - 1, i)
    i = tl.where((i + 1) * (n2 - i - 1) // 2 <= k, i + 1, i)
    j = i + k - i * (n2 - i) // 2
    rows_i = i * BLOCK_T + tl.arange(0, BLOCK_T)
    rows_j = j * BLOCK_T + tl.arange(0, BLOCK_T)
    return i, j, rows_i, rows_j, rows_i < T, rows_j < T


@triton.jit
def _gram_tile(
    base,
    rows_i,
    rows_j,
    mask_i,
    mask_j,
    K,
    s_t,
    s_k,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile (I, J) of X X^T for a (T, K) matrix X at ``base`` with strides (s_t, s_k), K in BLOCK_K chunks."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < K
        x = tl.load(
            base + rows_i[:, None] * s_t + cols[None, :] * s_k, mask=mask_i[:, None] & mask_k[None, :], other=0.0
        )
        y = tl.load(
            base + cols[:, None] * s_k + rows_j[None, :] * s_t, mask=mask_k[:, None] & mask_j[None, :], other=0.0
        )
        acc = tl.dot(x.to(DOT), y.to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _scaled_gram_tile(
    base,
    rows_i,
    rows_j,
    mask_i,
    mask_j,
    K,
    s_t,
    s_k,
    scale,
    SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,  # a multiple of BLOCK_K
):
    """`_gram_tile` in float32 of the rows multiplied by ``scale`` (a float32 power of two; SCALE False:
    the rows as they are) before they are rounded to the dot's operand dtype, summed in blocks: each
    CHUNK columns in a fresh accumulator, added to the total, so that a Gram entry goes through at most
    CHUNK + cdiv(K, CHUNK) roundings (`blocked_depth`), not K."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, K, CHUNK):
        part = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        for k1 in range(0, CHUNK, BLOCK_K):
            cols = k0 + k1 + offs_k
            mask_k = cols < K
            x = load_exact(base + rows_i[:, None] * s_t + cols[None, :] * s_k, mask_i[:, None] & mask_k[None, :])
            y = load_exact(base + cols[:, None] * s_k + rows_j[None, :] * s_t, mask_k[:, None] & mask_j[None, :])
            if SCALE:
                x = x * scale
                y = y * scale
            part = tl.dot(x.to(DOT), y.to(DOT), part, input_precision=PRECISION)
        acc += part
    return acc


@triton.jit
def _store_ghost(w_ptr, b_ptr, pid, aa, gg, i, j, HAS_BIAS: tl.constexpr):
    """A pair's partial norms <AA^T, GG^T> and sum(GG^T) over its tile (I, J)."""
    weight = tl.where(i == j, 1.0, 2.0)  # an off-diagonal tile stands for itself and its transpose
    tl.store(w_ptr + pid, tl.sum(aa * gg) * weight)
    if HAS_BIAS:
        tl.store(b_ptr + pid, tl.sum(gg) * weight)


@triton.jit
def _inst_step(
    acc, bacc, g, a, tile_d, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """One T-chunk of the inst reduction over G's rows g (T-chunk, p-tile) and A's a (T-chunk, d-tile):
    acc += g^T a, and on the first d-tile bacc += sum_t g."""
    acc = tl.dot(tl.trans(g).to(DOT), a.to(DOT), acc, input_precision=PRECISION)
    if HAS_BIAS and tile_d == 0:
        bacc += tl.sum(g.to(ACC), axis=0)
    return acc, bacc


@triton.jit
def _store_inst(w_ptr, b_ptr, pid, acc, bacc, HAS_BIAS: tl.constexpr):
    tl.store(w_ptr + pid, tl.sum(acc * acc))
    if HAS_BIAS:
        tl.store(b_ptr + pid, tl.sum(bacc * bacc))  # zero unless tile_d == 0


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _ghost_kernel(
    a_ptr,
    g_ptr,
    w_ptr,  # (B * n_pairs,) partial weight norms
    b_ptr,  # (B * n_pairs,) partial bias norms
    T,
    D,
    P,
    n_tiles,  # cdiv(T, BLOCK_T); n_tiles < 23170 so that (2 n_tiles + 1)^2 fits in int32
    n_pairs,  # n_tiles (n_tiles + 1) / 2
    s_ab,
    s_at,
    s_ad,
    s_gb,
    s_gt,
    s_gp,
    ACC: tl.constexpr,  # accumulation dtype: float32, float64 for float64 inputs
    PRECISION: tl.constexpr,  # tl.dot input_precision, see _common.dot_precision
    DOT: tl.constexpr,  # tl.dot operand dtype: the input's, see _common.dot_operand
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,  # chunk of the d (and p) reduction of the Gram tiles
):
    pid = tl.program_id(0)
    sample = pid // n_pairs
    i, j, rows_i, rows_j, mask_i, mask_j = _upper_pair(pid - sample * n_pairs, n_tiles, T, BLOCK_T)
    a_base = a_ptr + sample.to(tl.int64) * s_ab
    aa = _gram_tile(a_base, rows_i, rows_j, mask_i, mask_j, D, s_at, s_ad, ACC, PRECISION, DOT, BLOCK_T, BLOCK_K)
    g_base = g_ptr + sample.to(tl.int64) * s_gb
    gg = _gram_tile(g_base, rows_i, rows_j, mask_i, mask_j, P, s_gt, s_gp, ACC, PRECISION, DOT, BLOCK_T, BLOCK_K)
    _store_ghost(w_ptr, b_ptr, pid, aa, gg, i, j, HAS_BIAS)


@triton.jit
def _inst_kernel(
    a_ptr,
    g_ptr,
    w_ptr,  # (B * n_tiles,) partial weight norms
    b_ptr,  # (B * n_tiles,) partial bias norms
    T,
    D,
    P,
    n_tiles_d,
    n_tiles,  # p-tiles x d-tiles per sample
    s_ab,
    s_at,
    s_ad,
    s_gb,
    s_gt,
    s_gp,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,  # chunk of the T reduction
):
    pid = tl.program_id(0)
    sample = pid // n_tiles
    offs_p, mask_p, offs_d, mask_d, tile_d = tile_ranges(pid - sample * n_tiles, n_tiles_d, P, D, BLOCK_P, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    a_base = a_ptr + sample.to(tl.int64) * s_ab
    g_base = g_ptr + sample.to(tl.int64) * s_gb

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)  # tile of G_i^T A_i, never written out
    bacc = tl.zeros((BLOCK_P,), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + offs_t
        mask_t = rows < T
        g = tl.load(
            g_base + rows[:, None] * s_gt + offs_p[None, :] * s_gp, mask=mask_t[:, None] & mask_p[None, :], other=0.0
        )
        a = tl.load(
            a_base + rows[:, None] * s_at + offs_d[None, :] * s_ad, mask=mask_t[:, None] & mask_d[None, :], other=0.0
        )
        acc, bacc = _inst_step(acc, bacc, g, a, tile_d, ACC, PRECISION, DOT, HAS_BIAS)
    _store_inst(w_ptr, b_ptr, pid, acc, bacc, HAS_BIAS)


@triton.jit
def _bias_norms_kernel(
    g_ptr,
    out_ptr,  # (B * n_tiles,) partial norms
    T,
    P,
    n_tiles,
    s_gb,
    s_gt,
    s_gp,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """||sum_t g_t||^2, one program per (sample, p-tile): the affine bias norm (affine._channel_sums)."""
    pid = tl.program_id(0)
    sample = pid // n_tiles
    cols = (pid - sample * n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    g_base = g_ptr + sample.to(tl.int64) * s_gb
    _, s = _channel_sums(g_base, g_base, T, cols, cols < P, s_gt, s_gp, s_gt, s_gp, ACC, False, True, BLOCK_T, BLOCK_P)
    tl.store(out_ptr + pid, tl.sum(s * s))


# ----------------------------------------------------------------------------- configs


def ghost_config(T: int, d: int, p: int, dtype: torch.dtype) -> dict:
    """64x64 Gram tiles over d (and p) in matmul-sized chunks (_common.gram_tile_config, k_block)."""
    return gram_tile_config(T, max(d, p), k_block(dtype), dtype)


def ghost_bound_config(T: int, d: int, p: int, dtype: torch.dtype) -> dict:
    """ghost_config, with 32x32 tiles for float32 inputs: the bound kernel's blocked sums hold a third
    tile accumulator, and at 64x64 its IEEE (FMA) and TF32 variants spill 32-144 B on sm_90 (AOT report)."""
    if dtype == torch.float32:
        return gram_tile_config(min(T, 32), max(d, p), k_block(dtype), dtype)
    return ghost_config(T, d, p, dtype)


def inst_config(T: int, d: int, p: int, dtype: torch.dtype) -> dict:
    """128x128 output tiles on 8 warps, as for a plain matmul of the same shape (64x128 for FMA dots,
    see _common.matmul_config)."""
    return matmul_config(p, d, block(T, 16, k_block(dtype)), dtype, k_name="BLOCK_T")


def bias_config(T: int, p: int) -> dict:
    return dict(BLOCK_P=block(p, 16, 256), BLOCK_T=block(T, 1, 16), num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------- host side


def _launch_norms(kernel, cfg: dict, a: Tensor, g: Tensor, dt: torch.dtype, bias: bool, n: int, tiles: tuple):
    """One program per (sample, one of its n tiles), each writing its partial norms."""
    B, T, d = a.shape
    w, b = output(a, (B, n), dt), output(a, (B, n), dt, bias)
    if B * n > 0:
        launch(
            kernel,
            (B * n,),
            a,
            g,
            w,
            b,
            T,
            d,
            g.shape[2],
            *tiles,
            *a.stride(),
            *g.stride(),
            ACC=acc_tl(dt),
            PRECISION=dot_precision(a.dtype),
            DOT=dot_operand(kernel, a.dtype),
            HAS_BIAS=bias,
            **cfg,
        )
    return per_sample(w), per_sample(b)


def launch_ghost(a: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    (a, g), dt = cast_inputs("linear_norms", a, g)
    T, d, p = a.shape[1], a.shape[2], g.shape[2]
    cfg = ghost_config(T, d, p, a.dtype)
    n_tiles, n_pairs = ghost_pairs("linear_norms", T, cfg["BLOCK_T"])
    return _launch_norms(_ghost_kernel, cfg, a, g, dt, bias, n_pairs, (n_tiles, n_pairs))


def launch_inst(a: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    (a, g), dt = cast_inputs("linear_norms", a, g)
    T, d, p = a.shape[1], a.shape[2], g.shape[2]
    cfg = inst_config(T, d, p, a.dtype)
    n_tiles_d = max(1, triton.cdiv(d, cfg["BLOCK_D"]))  # d == 0: one column for the bias
    n_tiles = triton.cdiv(p, cfg["BLOCK_P"]) * n_tiles_d
    return _launch_norms(_inst_kernel, cfg, a, g, dt, bias, n_tiles, (n_tiles_d, n_tiles))


def launch_bias_norms(g: Tensor) -> Tensor:
    common_input("bias_norms", g)
    dt = acc_dtype(g)
    B, T, p = g.shape
    cfg = bias_config(T, p)
    n_tiles = triton.cdiv(p, cfg["BLOCK_P"])
    out = output(g, (B, n_tiles), dt)
    if B * n_tiles > 0:
        launch(_bias_norms_kernel, (B * n_tiles,), g, out, T, p, n_tiles, *g.stride(), ACC=acc_tl(dt), **cfg)
    return per_sample(out)


# ----------------------------------------------------------------------------- ops


def _norms_fake(a, g, bias):
    dt, B = acc_dtype(a, g), a.shape[0]
    return output(a, (B,), dt), output(a, (B,), dt, bias)


_linear_norms_ghost_op = register_op("linear_norms_ghost", _norms_fake)(launch_ghost)
_linear_norms_inst_op = register_op("linear_norms_inst", _norms_fake)(launch_inst)
_bias_norms_op = register_op("bias_norms", lambda g: output(g, (g.shape[0],), acc_dtype(g)))(launch_bias_norms)


def linear_norms(a: Tensor, g: Tensor, *, bias: bool, method: str) -> tuple[Tensor, Tensor | None]:
    """Per-sample squared norms of a Linear layer's weight and bias gradients.

    weight: ||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>          (method "ghost")
                              = sum_{p,d} (sum_t g_tp a_td)^2     (method "inst")
    bias:   ||sum_t g_t||^2
    a: (B, T, d), g: (B, T, p). Returns float32 (float64 for float64 inputs) tensors of shape (B,).
    """
    op = _linear_norms_ghost_op if method == "ghost" else _linear_norms_inst_op
    w, b = op(a, g, bias)
    return w, (b if bias else None)


def bias_norms(g: Tensor) -> Tensor:
    """Per-sample squared norms of a bias gradient: ||sum_t g_t||^2, g: (B, T, p)."""
    return _bias_norms_op(g)


# ----------------------------------------------------------------------------- certified bounds
#
# The bounds of the squared norms above that the engine clips by (dpkernels/ops/bounds.py: the model,
# `Bound`), computed by the kernels themselves: see `linear_norms_bound`. Kernel arithmetic is float32
# (the dots, the tile statistics), float64 where noted; u = 2^-24, and eta = 2^-126 bounds the
# absolute error of any float32 rounding of a result below the normal range, subnormal or flushed to
# zero (tensor cores and FTZ included).

U32 = 2.0**-24
ETA32 = 2.0**-126
HUGE = tl.constexpr(2.0**124)  # a tile whose largest token norm reaches this is left to the cap (see _pow2_scale)


@triton.jit
def _row_sumsq(base, rows, mask_r, K, s_t, s_k, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """float64 sums of squares of the rows ``rows`` of a (T, K) matrix of float32 or 16-bit values."""
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        x = load_exact(base + rows[:, None] * s_t + cols[None, :] * s_k, mask_r[:, None] & (cols < K)[None, :])
        x = x.to(tl.float64)
        acc += x * x
    return tl.sum(acc, axis=1)


@triton.jit
def _token_norms_kernel(
    a_ptr,
    g_ptr,
    na_ptr,  # (B, T) float64
    ng_ptr,  # (B, T) float64
    T,
    D,
    P,
    n_tiles,
    s_ab,
    s_at,
    s_ad,
    s_gb,
    s_gt,
    s_gp,
    F_A,  # round-up factors of the d- and p-long sums, see token_norm_factor
    F_G,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Upper bounds on the token norms |a_t|, |g_t| of one (sample, T-tile), float64 (`token_norm_factor`)."""
    pid = tl.program_id(0)
    sample = pid // n_tiles
    rows = (pid - sample * n_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = rows < T
    qa = _row_sumsq(a_ptr + sample.to(tl.int64) * s_ab, rows, mask, D, s_at, s_ad, BLOCK_T, BLOCK_K)
    qg = _row_sumsq(g_ptr + sample.to(tl.int64) * s_gb, rows, mask, P, s_gt, s_gp, BLOCK_T, BLOCK_K)
    out = sample.to(tl.int64) * T + rows
    tl.store(na_ptr + out, tl.sqrt(qa) * F_A, mask=mask)
    tl.store(ng_ptr + out, tl.sqrt(qg) * F_G, mask=mask)


@triton.jit
def _pow2_scale(m):
    """The float32 power of two s with s m in [1/2, 1) for a float64 m >= 0, its exponent clamped to
    [-125, 125] (s a normal float32): s m < 1 unless m >= 2^126 (`HUGE` flags those), and s m < 1/2
    for m < 2^-126. Exact: the exponent bits of m."""
    e = ((m.to(tl.int64, bitcast=True) >> 52) & 2047).to(tl.int32)  # m in [2^(e-1023), 2^(e-1022))
    k = tl.minimum(tl.maximum(1022 - e, -125), 125)
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _up32(x):
    """A float32 upper bound on float64 x >= 0 (at least 2^-126, so never subnormal): rounding to nearest
    loses at most 2^-24 relative of a normal value, which the 2^-22 margin covers, float64 roundings too."""
    return (x * (1.0 + 2.0**-22) + 2.0**-126).to(tl.float32)


@triton.jit
def _ghost_bound_tile(
    aa, gg, na_i, na_j, ng_i, ng_j, sa, sg, huge, i, j, G_A, E_A, G_G, E_G, C_V, F_SUM, F_OUT, BLOCK_T: tl.constexpr
):
    """(value, err, cap part) of one pair of T-tiles (I, J), float64, unscaled; see `linear_norms_bound`.

    aa, gg: the float32 tiles X' = fl(A'_I A'_J^T), Y' = fl(G'_I G'_J^T) of the rows scaled by sa, sg;
    na, ng: float64 upper bounds on the unscaled token norms of the tiles' rows (0 past T)."""
    sa64, sg64 = sa.to(tl.float64), sg.to(tl.float64)
    nu_i, nu_j = na_i * sa64, na_j * sa64  # scaled token norms: exact (powers of two), all < 1
    mu_i, mu_j = ng_i * sg64, ng_j * sg64
    prod = aa * gg
    ax, ay = tl.abs(aa), tl.abs(gg)
    # float32 row sums (BLOCK_T terms), then float64 sums over the rows
    v = tl.sum(tl.sum(prod, axis=1).to(tl.float64), axis=0)
    s6 = tl.sum(tl.sum(tl.abs(prod), axis=1).to(tl.float64), axis=0)
    s1 = tl.sum(nu_i * tl.sum(ay * _up32(nu_j)[None, :], axis=1).to(tl.float64), axis=0)
    s2 = tl.sum(tl.sum(ay, axis=1).to(tl.float64), axis=0)
    s3 = tl.sum(mu_i * tl.sum(ax * _up32(mu_j)[None, :], axis=1).to(tl.float64), axis=0)
    s4 = tl.sum(tl.sum(ax, axis=1).to(tl.float64), axis=0)
    m = tl.maximum(tl.max(nu_i, axis=0), tl.max(nu_j, axis=0)) + tl.maximum(tl.max(mu_i, axis=0), tl.max(mu_j, axis=0))
    absn = 4.0 * BLOCK_T * BLOCK_T * 2.0**-126 * (1.0 + m)
    s5 = G_A * G_G * tl.sum(nu_i * mu_i, axis=0) * tl.sum(nu_j * mu_j, axis=0)
    s5 += G_A * E_G * tl.sum(nu_i, axis=0) * tl.sum(nu_j, axis=0)
    s5 += E_A * G_G * tl.sum(mu_i, axis=0) * tl.sum(mu_j, axis=0)
    s5 += E_A * E_G * BLOCK_T * BLOCK_T
    err = G_A * (s1 * F_SUM + absn) + E_A * (s2 * F_SUM + absn) + G_G * (s3 * F_SUM + absn)
    err += E_G * (s4 * F_SUM + absn) + s5 + C_V * (s6 * F_SUM + absn) + absn
    w = tl.where(i == j, 1.0, 2.0).to(tl.float64)  # an off-diagonal tile stands for itself and its transpose
    inv = w / ((sa64 * sg64) * (sa64 * sg64))
    err = tl.where(huge, float("inf"), err * inv * F_OUT)
    cap = tl.where(i == j, tl.sum(na_i * ng_i, axis=0) * F_OUT, 0.0)
    return v * inv, err, cap


@triton.jit
def _ghost_bound_kernel(
    a_ptr,
    g_ptr,
    na_ptr,  # (B, T) float64 token norm bounds (_token_norms_kernel)
    ng_ptr,
    out_ptr,  # (B * n_pairs, 3) float64: value, err, cap part
    T,
    D,
    P,
    n_tiles,
    n_pairs,
    s_ab,
    s_at,
    s_ad,
    s_gb,
    s_gt,
    s_gp,
    G_A,  # coefficients of the bound, see linear_norms_bound
    E_A,
    G_G,
    E_G,
    C_V,
    F_SUM,
    F_OUT,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
    SCALE: tl.constexpr,  # scale each tile's rows by a power of two (float32, bfloat16; not float16)
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_A: tl.constexpr,  # block of the d-long sums (blocked_chunk)
    CHUNK_G: tl.constexpr,  # of the p-long sums
):
    pid = tl.program_id(0)
    sample = pid // n_pairs
    i, j, rows_i, rows_j, mask_i, mask_j = _upper_pair(pid - sample * n_pairs, n_tiles, T, BLOCK_T)
    nb = na_ptr + sample.to(tl.int64) * T
    gb = ng_ptr + sample.to(tl.int64) * T
    na_i = tl.load(nb + rows_i, mask=mask_i, other=0.0)
    na_j = tl.load(nb + rows_j, mask=mask_j, other=0.0)
    ng_i = tl.load(gb + rows_i, mask=mask_i, other=0.0)
    ng_j = tl.load(gb + rows_j, mask=mask_j, other=0.0)
    if SCALE:
        ma = tl.maximum(tl.max(na_i, axis=0), tl.max(na_j, axis=0))
        mg = tl.maximum(tl.max(ng_i, axis=0), tl.max(ng_j, axis=0))
        sa, sg = _pow2_scale(ma), _pow2_scale(mg)
        huge = (ma >= HUGE) | (mg >= HUGE)
    else:
        sa, sg, huge = tl.full((), 1.0, tl.float32), tl.full((), 1.0, tl.float32), False
    a_base = a_ptr + sample.to(tl.int64) * s_ab
    aa = _scaled_gram_tile(
        a_base, rows_i, rows_j, mask_i, mask_j, D, s_at, s_ad, sa, SCALE, PRECISION, DOT, BLOCK_T, BLOCK_K, CHUNK_A
    )
    g_base = g_ptr + sample.to(tl.int64) * s_gb
    gg = _scaled_gram_tile(
        g_base, rows_i, rows_j, mask_i, mask_j, P, s_gt, s_gp, sg, SCALE, PRECISION, DOT, BLOCK_T, BLOCK_K, CHUNK_G
    )
    v, err, cap = _ghost_bound_tile(
        aa, gg, na_i, na_j, ng_i, ng_j, sa, sg, huge, i, j, G_A, E_A, G_G, E_G, C_V, F_SUM, F_OUT, BLOCK_T
    )
    tl.store(out_ptr + pid * 3, v)
    tl.store(out_ptr + pid * 3 + 1, err)
    tl.store(out_ptr + pid * 3 + 2, cap)


@triton.jit
def _inst_bound_kernel(
    a_ptr,
    g_ptr,
    na_ptr,
    ng_ptr,
    out_ptr,  # (B * n_tiles, 3) float64: value, norm error (first tile), cap norm (first tile)
    T,
    D,
    P,
    n_tiles_d,
    n_tiles,
    s_ab,
    s_at,
    s_ad,
    s_gb,
    s_gt,
    s_gp,
    G_T,
    E_T,
    F_SQ,
    F_OUT,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    CHUNK: tl.constexpr,  # block of the T-long sums (blocked_chunk)
):
    pid = tl.program_id(0)
    sample = pid // n_tiles
    tile = pid - sample * n_tiles
    offs_p, mask_p, offs_d, mask_d, _ = tile_ranges(tile, n_tiles_d, P, D, BLOCK_P, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    nb = na_ptr + sample.to(tl.int64) * T
    gb = ng_ptr + sample.to(tl.int64) * T
    # the sample's largest token norms (its scale) and S = sum_t |a_t| |g_t| (the cap)
    ma = tl.zeros((BLOCK_T,), dtype=tl.float64)
    mg = tl.zeros((BLOCK_T,), dtype=tl.float64)
    s = tl.zeros((BLOCK_T,), dtype=tl.float64)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + offs_t
        na = tl.load(nb + rows, mask=rows < T, other=0.0)
        ng = tl.load(gb + rows, mask=rows < T, other=0.0)
        ma, mg, s = tl.maximum(ma, na), tl.maximum(mg, ng), s + na * ng
    ma, mg, s = tl.max(ma, axis=0), tl.max(mg, axis=0), tl.sum(s, axis=0)
    if SCALE:
        sa, sg = _pow2_scale(ma), _pow2_scale(mg)
        huge = (ma >= HUGE) | (mg >= HUGE)
    else:
        sa, sg, huge = tl.full((), 1.0, tl.float32), tl.full((), 1.0, tl.float32), False
    a_base = a_ptr + sample.to(tl.int64) * s_ab
    g_base = g_ptr + sample.to(tl.int64) * s_gb
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, CHUNK):  # blocked: CHUNK rows in a fresh accumulator (see _scaled_gram_tile)
        part = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        for t1 in range(0, CHUNK, BLOCK_T):
            rows = t0 + t1 + offs_t
            mask_t = rows < T
            g = load_exact(g_base + rows[:, None] * s_gt + offs_p[None, :] * s_gp, mask_t[:, None] & mask_p[None, :])
            a = load_exact(a_base + rows[:, None] * s_at + offs_d[None, :] * s_ad, mask_t[:, None] & mask_d[None, :])
            if SCALE:
                g = g * sg
                a = a * sa
            part = tl.dot(tl.trans(g).to(DOT), a.to(DOT), part, input_precision=PRECISION)
        acc += part
    sa64, sg64 = sa.to(tl.float64), sg.to(tl.float64)
    v = tl.sum(tl.sum(acc * acc, axis=1).to(tl.float64), axis=0)
    v = (v * F_SQ + 2.0 * BLOCK_P * BLOCK_D * 2.0**-126) / ((sa64 * sg64) * (sa64 * sg64)) * F_OUT
    first = tile == 0
    e = tl.where(huge, float("inf"), (G_T * s + E_T / (sa64 * sg64)) * F_OUT)
    tl.store(out_ptr + pid * 3, v)
    tl.store(out_ptr + pid * 3 + 1, tl.where(first, e, 0.0))
    tl.store(out_ptr + pid * 3 + 2, tl.where(first, s * F_OUT, 0.0))


# ----------------------------------------------------------------------------- certified bounds: host side


def token_norm_factor(k: int) -> float:
    """f such that fl(sqrt(q)) * f >= |x| for q the float64 sum of the k squares of a float32 or 16-bit
    row x (`_row_sumsq`): the squares are exact in float64 (48 significant bits; no overflow or
    underflow from float32's range), their sum errs by at most gamma_k(2^-53) relative, the float64
    square root (sqrt.rn) and the product by f by one rounding each: 1 / ((1 - u)^2 (1 - gamma_k))^(1/2)
    <= 1 + 2 gamma_{k+10}(2^-53), with room for a square root a few ulps off."""
    return round_up_factor(k + 8)


def _dot_arith(dtype: torch.dtype) -> tuple[float, float]:
    """(u_dot, u_in) of the kernels' tl.dot on operands of ``dtype``: u_in = 2^-10 where float32 operands
    go to TF32 tensor cores (`bounds.backend_arithmetic`), else 0 (16-bit operands and their products
    are exact in float32). u_dot = 2^-23 for tensor-core accumulation (TF32, bf16, fp16), which may
    truncate instead of rounding to nearest (an error below 2u = 2^-23 per addition, Fasi, Higham,
    Mikaitis and Pranesh 2021), 2^-24 for IEEE float32 FMA dots."""
    u_in = backend_arithmetic(dtype)[1]
    tensor_cores = dtype in (torch.float16, torch.bfloat16) or dot_precision(dtype) == "tf32"
    return (2.0 * U32 if tensor_cores else U32), u_in


def blocked_chunk(n: int, block_k: int) -> int:
    """The block of a blocked n-long sum in steps of block_k: the power of two near sqrt(n), at least
    block_k (a multiple of it) and at most max(block_k, 64) (longer unrolled inner loops spilled on sm_90
    at p = 50257, AOT report), so that the depth (`blocked_depth`) is ~2 sqrt(n) for n up to 4096."""
    return max(block_k, min(64, triton.next_power_of_2(max(1, math.isqrt(max(n, 1))))))


def blocked_depth(n: int, chunk: int) -> int:
    """The most roundings a term of a blocked dot product of length n goes through: its product, at most
    min(chunk, n) - 1 additions in its block's accumulator (which starts at zero), then at most
    cdiv(n, chunk) - 1 additions of block sums into the total (the first lands on zero, exactly;
    Higham 2002, sec. 4.2: blocked summation), so the error is at most gamma_{depth}(u) times the sum
    of |products|, whatever the order inside the blocks."""
    n = max(n, 1)
    return min(chunk, n) + triton.cdiv(n, chunk) - 1


def _token_norms(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) float64 upper bounds on a's and g's token norms: one pass over both, 32 rows a program."""
    B, T, d = a.shape
    p = g.shape[2]
    na, ng = output(a, (B, T), torch.float64), output(a, (B, T), torch.float64)
    bt, bk = block(T, 16, 32), block(max(d, p), 16, 64)
    n_tiles = triton.cdiv(T, bt)
    if B * n_tiles > 0:
        launch(
            _token_norms_kernel,
            (B * n_tiles,),
            a,
            g,
            na,
            ng,
            T,
            d,
            p,
            n_tiles,
            *a.stride(),
            *g.stride(),
            token_norm_factor(d),
            token_norm_factor(p),
            BLOCK_T=bt,
            BLOCK_K=bk,
            num_warps=4,
            num_stages=2,
        )
    return na, ng


def _launch_bound(kernel, a: Tensor, g: Tensor, n_parts: int, ints: tuple, coef: dict, **meta) -> Tensor:
    """What both bound kernels share: the token-norm pre-pass, one program per (sample, part) writing
    (value, err, cap) in float64, the parts summed per sample in a fixed order. Arguments in the kernels'
    order: a, g, na, ng, out, T, d, p, ``ints``, the strides, ``coef`` (the bound's constants), then the
    dot's precision and operand, whether rows are scaled (not float16: see `linear_norms_bound`)."""
    B, T, d = a.shape
    p = g.shape[2]
    na, ng = _token_norms(a, g)
    out = output(a, (B, n_parts, 3), torch.float64)
    if B * n_parts > 0:
        launch(
            kernel,
            (B * n_parts,),
            a,
            g,
            na,
            ng,
            out,
            T,
            d,
            p,
            *ints,
            *a.stride(),
            *g.stride(),
            *coef.values(),
            PRECISION=dot_precision(a.dtype),
            DOT=dot_operand(kernel, a.dtype),
            SCALE=a.dtype != torch.float16,
            **meta,
        )
    return out.sum(1)


def launch_ghost_bound(a: Tensor, g: Tensor) -> Tensor:
    """(B, 3) float64 (value, err, cap norm) of the ghost norm; see `linear_norms_bound`. float32 and
    16-bit inputs (float64 ones are bounded by the reference)."""
    (a, g), _ = cast_inputs("linear_norms", a, g)
    _, T, d = a.shape
    p = g.shape[2]
    cfg = ghost_bound_config(T, d, p, a.dtype)
    bt = cfg["BLOCK_T"]
    n_tiles, n_pairs = ghost_pairs("linear_norms", T, bt)
    u_dot, u_in = _dot_arith(a.dtype)
    ca, cg = blocked_chunk(d, cfg["BLOCK_K"]), blocked_chunk(p, cfg["BLOCK_K"])
    coef = dict(
        G_A=dot_gamma(blocked_depth(d, ca), u_dot, u_in),
        E_A=8.0 * d * ETA32,
        G_G=dot_gamma(blocked_depth(p, cg), u_dot, u_in),
        E_G=8.0 * p * ETA32,
        C_V=gamma(bt + 1, U32) + 2.0 * gamma(bt + 2, U64) + 2.0 * gamma(n_pairs + 2, U64),
        F_SUM=(1.0 + 2.0 * gamma(bt + 2, U32)) * (1.0 + 2.0 * gamma(bt + 4, U64)),
        F_OUT=round_up_factor(n_pairs + bt + 64),
    )
    return _launch_bound(_ghost_bound_kernel, a, g, n_pairs, (n_tiles, n_pairs), coef, CHUNK_A=ca, CHUNK_G=cg, **cfg)


def launch_inst_bound(a: Tensor, g: Tensor) -> Tensor:
    """(B, 3) float64 (||W||^2 bound, norm error, cap norm) of the instantiated norm; see
    `linear_norms_bound`. float32 and 16-bit inputs."""
    (a, g), _ = cast_inputs("linear_norms", a, g)
    _, T, d = a.shape
    p = g.shape[2]
    cfg = inst_config(T, d, p, a.dtype)
    n_tiles_d = triton.cdiv(d, cfg["BLOCK_D"])
    n_tiles = triton.cdiv(p, cfg["BLOCK_P"]) * n_tiles_d
    u_dot, u_in = _dot_arith(a.dtype)
    bp, bd = cfg["BLOCK_P"], cfg["BLOCK_D"]
    ct = blocked_chunk(T, cfg["BLOCK_T"])
    coef = dict(
        G_T=dot_gamma(blocked_depth(T, ct), u_dot, u_in),
        E_T=10.0 * T * ETA32 * math.sqrt(p * d),
        F_SQ=(1.0 + 2.0 * gamma(bd + 2, U32)) * (1.0 + 2.0 * gamma(bp + 2, U64)),
        F_OUT=round_up_factor(n_tiles + T + 32),
    )
    return _launch_bound(_inst_bound_kernel, a, g, n_tiles, (n_tiles_d, n_tiles), coef, CHUNK=ct, **cfg)


def launch_token_norms(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) float64 upper bounds on the token norms |a_t|, |g_t| (`_token_norms`)."""
    (a, g), _ = cast_inputs("linear_norms", a, g)
    return _token_norms(a, g)


def _bound_fake(a: Tensor, g: Tensor) -> Tensor:
    return output(a, (a.shape[0], 3), torch.float64)


_ghost_bound_op = register_op("linear_norms_ghost_bound", _bound_fake)(launch_ghost_bound)
_inst_bound_op = register_op("linear_norms_inst_bound", _bound_fake)(launch_inst_bound)
_token_norms_op = register_op(
    "token_norms", lambda a, g: (output(a, a.shape[:2], torch.float64), output(a, a.shape[:2], torch.float64))
)(launch_token_norms)


def bias_norms_bound(g: Tensor) -> Bound:
    """Bound of the per-sample squared bias norms ||sum_t g_t||^2, g: (B, T, p): `sum_bound` for
    float32 and 16-bit inputs, the reference's bound otherwise."""
    if not tight(g):
        return _ref_bounds.bias_norms_bound(g)
    return sum_bound(None, g)


def linear_norms_bound(a: Tensor, g: Tensor, *, bias: bool, method: str) -> tuple[Bound, Bound | None]:
    """Bounds (dpkernels/ops/bounds.py) of the per-sample squared norms of linear_norms, computed by the
    kernels: n_i <= value + err and n_i <= cap for the exact norms of the stored a (B, T, d), g (B, T, p).

    float64 inputs and empty dimensions are bounded by the reference. One token per sample (T == 1):
    n = |a_1|^2 |g_1|^2 <= (na_1 ng_1)^2 from the pre-pass's token norms (below), rounded up, both value
    and cap. Otherwise (float32, bfloat16, float16; u = 2^-24 for the
    float32 arithmetic of the epilogues, u_dot, u_in of the dots by `_dot_arith`, eta = 2^-126 for any
    rounding below float32's normal range, flushed or not):

    Token norms. A pre-pass writes float64 upper bounds na_t >= |a_t|, ng_t >= |g_t| (`_row_sumsq`,
    `token_norm_factor`). The cap is (sum_t na_t ng_t)^2, the triangle inequality.

    ghost. Program (I, J), I <= J, scales the rows of the tile pair by powers of two s_a, s_g with
    s_a max_{t in I u J} na_t in [1/2, 1) (`_pow2_scale`; float16 is not scaled: its products and their
    float32 sums neither overflow nor underflow), so nu_t = s_a na_t < 1, mu_t = s_g ng_t < 1. A scaled
    entry rounded to the dot's operand is A'_tk = s_a a_tk (1 + theta) + eps, |theta| <= u_in,
    |eps| <= eta (a result below the normal range). The tile X' = fl(A'_I A'_J^T) then satisfies, with
    x' = s_a^2 a_t . a_s and Higham's dot-product bound over the blocked d-long sum (`blocked_depth`:
    m_d <= CHUNK + cdiv(d, CHUNK) roundings, CHUNK ~ sqrt(d), not d),

        |X'_ts - x'_ts| <= alpha_ts = G_a nu_t nu_s + E_a,   G_a = (1 + u_in)^2 (1 + gamma_{m_d+1}(u_dot)) - 1,
                                                           E_a = 8 d eta

    (the cross terms of eps with |A'_t| <= (1 + u_in) nu_t + sqrt(d) eta < 2 and the d product and
    addition underflows fit in E_a), and likewise |Y'_ts - y'_ts| <= beta_ts with G_g, E_g over p.
    From XY - xy = (X - x) Y + X (Y - y) - (X - x)(Y - y), the tile's error is at most

        G_a sum |Y'| nu_t nu_s + E_a sum |Y'| + G_g sum |X'| mu_t mu_s + E_g sum |X'| + sum alpha beta

    where sum alpha beta = G_a G_g (sum_I nu mu)(sum_J nu mu) + G_a E_g (sum_I nu)(sum_J nu) + ... in
    float64. The four sums over the tile and sum |X'Y'| are formed in float32 as row sums (BLOCK_T
    terms, one product each: relative gamma_{BLOCK_T+1}(u), absolute 2 BLOCK_T eta a row) then summed
    over rows in float64 with the outer nu_t (gamma_{BLOCK_T+1}(2^-53)); nu_s in float32 is rounded up
    (`_up32`). F_SUM and absn = 4 BLOCK_T^2 eta (1 + max nu + max mu) turn each computed sum into an
    upper bound on the exact one. The value fl(sum X'Y') (float32 row sums, float64 over rows, float64
    over programs on the host) errs by at most C_V sum |X'Y'| + absn, C_V = gamma_{BLOCK_T+1}(u) +
    2 gamma_{BLOCK_T+2}(2^-53) + 2 gamma_{n_pairs+2}(2^-53). Each program divides by (s_a s_g)^2 (exact),
    weighs an off-diagonal pair 2 (it stands for its transpose too) and scales err by F_OUT =
    round_up_factor(n_pairs + BLOCK_T + 64) for the float64 roundings of the combination, the cap part
    and the host's sum over programs. A pair whose token norms reach 2^124 (float32 data near its
    overflow) gets err = inf: the cap bounds it.

    inst. Program (p-tile, d-tile) scales the sample's rows by s_a, s_g from the sample's largest token
    norms and forms its tile W' of fl(G'^T A') (a blocked T-long sum, G_T over its depth m_T).
    Entrywise |W' - w'| <= G_T (|g'|^T |a'|)
    + (underflow and eps terms), so ||W' - w'||_F <= G_T sum_t mu_t nu_t + E_T, E_T = 10 T eta sqrt(p d)
    (||sum_t |x_t| |y_t|^T||_F <= sum_t |x_t| |y_t|); the tiles' float32 sums of squares (F_SQ, 2
    BLOCK_P BLOCK_D eta) bound ||W'||_F^2, and n <= (||W'||_F + ||W' - w'||_F)^2 / (s_a s_g)^2
    (`bounds.from_norm_error`).

    bias: `sum_bound`, float64 sums of g over T (`bias_norms_bound`)."""
    if method not in ("ghost", "inst"):
        raise ValueError(f"linear_norms: method must be 'ghost' or 'inst', got {method!r}")
    if not tight(a, g):
        return _ref_bounds.linear_norms_bound(a, g, bias=bias, method=method)
    if a.shape[1] == 1:
        na, ng = _token_norms_op(a, g)
        up = (na * ng).square().flatten() * round_up_factor(2)  # two float64 roundings: the product, the square
        w = Bound(up, torch.zeros_like(up), up)
    elif method == "ghost":
        out = _ghost_bound_op(a, g)
        w = Bound(out[:, 0], out[:, 1], out[:, 2].square())
    else:
        out = _inst_bound_op(a, g)
        w = from_norm_error(out[:, 0], 0.0, out[:, 1], out[:, 2])
    return w, (bias_norms_bound(g) if bias else None)
