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

import torch
import triton
import triton.language as tl
from torch import Tensor

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
    matmul_config,
    output,
    per_sample,
    register_op,
    tile_ranges,
)
from .affine import _channel_sums

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
