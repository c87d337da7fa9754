"""Conv1d/2d/3d per-sample norms and clipped sum as implicit GEMM: unfold(x) is never written to memory.

A convolution is, per sample i and group j, a Linear layer on the unfolded input (ops.reference.conv):

    A_ij: (T, d)  row t = the input window output position t sees, d = C_in/groups * prod(k),
                  columns ordered (c, k_1, ..., k_n) as the weight (C_out, C_in/groups, *k) flattened
    G_ij: (T, p)  the output gradient of group j's p = C_out/groups channels

    ghost:  ||grad_i W||^2 = sum_j <A_ij A_ij^T, G_ij G_ij^T>
    inst:   ||grad_i W||^2 = sum_j sum_{q,e} (G_ij^T A_ij)_{qe}^2
    bias:   ||sum_t g_it||^2                  (= sum_j of the sums of G_ij G_ij^T's entries)
    sum:    W = scale * (prev_w + sum_i c_i G_i^T A_i + noise_std * z_w)  in the weight's layout
            b = scale * (prev_b + sum_i c_i sum_t g_it + noise_std * z_b)

The kernels are those of linear_norms.py and linear_clipped_sum.py with one change: a tile of A is
gathered from x as it loads. Entry (t, e) of A_ij is x[i, j C_in/groups + c, o(t) * stride - padding +
k(e) * dilation] (per spatial dim), zero where that falls in the padding: the row part (the window's
corner o * stride - padding) and the column part (the channel c and the offset k * dilation) are
computed once per tile from the row and column indices, their sum is the address and the bounds check
per dim is the load mask. 1-d and 2-d convs run as 3-d ones with leading spatial dims of size 1, and
the ``NDIM`` constexpr drops the arithmetic of those dims.

ghost: one program per (sample, group, pair of T-tiles I <= J) forms A_I A_J^T and G_I G_J^T in
registers and sums their elementwise product (off-diagonal pairs twice); the same G Gram tile gives
the bias norm. inst: one program per (sample, group, p-tile, d-tile) forms that tile of G^T A over T
and sums its squares; the first d-tile also sums G over T for the bias. Partial norms are summed on
the host in a fixed order (deterministic, no atomics). clipped sum: one program per (group, p-tile,
d-tile) reduces all B*T rows, c_i folded into G's rows as they load, split-K when the output tiles
cannot fill the GPU, and the shared Philox epilogue (add_noise.py) writes the (C_out, d) weight once;
its noise is that of add_noise for the weight's shape and seed.

Accumulation in float32 (float64 for float64 inputs); fp16 tiles of c_i g_it are block-scaled into
fp16's range as in linear_clipped_sum.py (_common.fp16_block_scale). Cases the kernels do not take, which the Python
wrappers send to the reference ops explicitly: more than 3 spatial dims; C_in or C_out = 0; a sample
of x or g whose offsets do not fit int32 (>= 2**31 elements), or B * T >= 2**31 rows (clipped sum).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..bounds import Bound
from ..reference import bounds as _ref_bounds
from ..reference import conv as ref_conv
from ._common import (
    FP16_SCALE_START,
    acc_dtype,
    acc_tl,
    block,
    cast_inputs,
    clipped_rows,
    common_input,
    dot_operand,
    dot_precision,
    epilogue_args,
    fp16_block_scale,
    ghost_pairs,
    given_or,
    gram_tile_config,
    launch,
    matmul_config,
    output,
    per_sample,
    register_op,
    tile_ranges,
)
from .add_noise import WIDE_OFFSETS, RowSplit, _store_tile, _store_vector
from .affine import tight
from .linear_norms import (
    _gram_tile,
    _inst_step,
    _store_ghost,
    _store_inst,
    _upper_pair,
    bias_norms_bound,
    linear_norms_bound,
)

IntOrSeq = int | Sequence[int]
INT32 = 1 << 31

# ----------------------------------------------------------------------------- index arithmetic


@triton.jit
def _window(t, O_H, O_W, ST_D, ST_H, ST_W, PAD_D, PAD_H, PAD_W, NDIM: tl.constexpr):
    """Output position t (row-major over the output grid) -> the first input coordinate of its
    window per dim, o * stride - padding (negative inside the leading zero padding)."""
    if NDIM == 1:
        w = t * ST_W - PAD_W
        return w, w, w  # the first two stand for absent dims, never read
    elif NDIM == 2:
        oh = t // O_W
        return t, oh * ST_H - PAD_H, (t - oh * O_W) * ST_W - PAD_W
    else:
        od = t // (O_H * O_W)
        r = t - od * (O_H * O_W)
        oh = r // O_W
        return od * ST_D - PAD_D, oh * ST_H - PAD_H, (r - oh * O_W) * ST_W - PAD_W


@triton.jit
def _taps(col, KK, K_H, K_W, DIL_D, DIL_H, DIL_W, NDIM: tl.constexpr):
    """Column e = c * prod(k) + (k_1, ..., k_n) row-major -> (c, k_1 * dil_1, ..., k_n * dil_n)."""
    ch = col // KK
    r = col - ch * KK
    if NDIM == 1:
        return ch, r, r, r * DIL_W
    elif NDIM == 2:
        kh = r // K_W
        return ch, r, kh * DIL_H, (r - kh * K_W) * DIL_W
    else:
        kd = r // (K_H * K_W)
        r2 = r - kd * (K_H * K_W)
        kh = r2 // K_W
        return ch, kd * DIL_D, kh * DIL_H, (r2 - kh * K_W) * DIL_W


@triton.jit
def _gather(wd, wh, ww, mask_r, ch, kd, kh, kw, mask_c, S_D, S_H, S_W, s_xc, s_xd, s_xh, s_xw, NDIM: tl.constexpr):
    """Offsets (from the sample-group's first channel) and mask of the unfold tile [rows, cols]:
    x[c, window + tap] per dim, masked where that lies in the zero padding."""
    iw = ww[:, None] + kw[None, :]
    mask = mask_r[:, None] & mask_c[None, :] & (iw >= 0) & (iw < S_W)
    offs = ch[None, :] * s_xc + iw * s_xw
    if NDIM >= 2:
        ih = wh[:, None] + kh[None, :]
        mask = mask & (ih >= 0) & (ih < S_H)
        offs += ih * s_xh
    if NDIM == 3:
        i_d = wd[:, None] + kd[None, :]
        mask = mask & (i_d >= 0) & (i_d < S_D)
        offs += i_d * s_xd
    return offs, mask


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _conv_ghost_kernel(
    x_ptr,
    g_ptr,
    w_ptr,  # (B * groups * n_pairs,) partial weight norms
    b_ptr,  # (B * groups * n_pairs,) partial bias norms
    T,
    D,  # C_in/groups * prod(k)
    P,  # C_out/groups
    CIN_G,  # C_in/groups
    groups,
    n_tiles,  # cdiv(T, BLOCK_T) < 23170, so that (2 n_tiles + 1)^2 fits int32
    n_pairs,  # n_tiles (n_tiles + 1) / 2
    O_H,
    O_W,
    S_D,
    S_H,
    S_W,
    KK,
    K_H,
    K_W,
    ST_D,
    ST_H,
    ST_W,
    PAD_D,
    PAD_H,
    PAD_W,
    DIL_D,
    DIL_H,
    DIL_W,
    s_xb,
    s_xc,
    s_xd,
    s_xh,
    s_xw,
    s_gb,
    s_gc,
    s_gt,
    ACC: tl.constexpr,  # accumulation dtype: float32, float64 for float64 inputs
    PRECISION: tl.constexpr,  # tl.dot input_precision, see _common.dot_precision
    DOT: tl.constexpr,  # tl.dot operand dtype, see _common.dot_operand
    HAS_BIAS: tl.constexpr,
    NDIM: tl.constexpr,  # spatial dims: the index arithmetic of absent ones is not emitted
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,  # chunk of the d (and p) reduction of the Gram tiles
):
    pid = tl.program_id(0)
    sg = pid // n_pairs
    sample = sg // groups
    grp = sg - sample * groups
    i, j, rows_i, rows_j, mask_i, mask_j = _upper_pair(pid - sg * n_pairs, n_tiles, T, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    # the windows of both row tiles, once: only the columns move in the reduction
    di, hi, wi = _window(rows_i, O_H, O_W, ST_D, ST_H, ST_W, PAD_D, PAD_H, PAD_W, NDIM)
    dj, hj, wj = _window(rows_j, O_H, O_W, ST_D, ST_H, ST_W, PAD_D, PAD_H, PAD_W, NDIM)

    x_base = x_ptr + sample.to(tl.int64) * s_xb + (grp * CIN_G).to(tl.int64) * s_xc
    aa = tl.zeros((BLOCK_T, BLOCK_T), dtype=ACC)  # tile (I, J) of A A^T
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < D
        ch, kd, kh, kw = _taps(cols, KK, K_H, K_W, DIL_D, DIL_H, DIL_W, NDIM)
        oi, mi = _gather(di, hi, wi, mask_i, ch, kd, kh, kw, mask_k, S_D, S_H, S_W, s_xc, s_xd, s_xh, s_xw, NDIM)
        oj, mj = _gather(dj, hj, wj, mask_j, ch, kd, kh, kw, mask_k, S_D, S_H, S_W, s_xc, s_xd, s_xh, s_xw, NDIM)
        x = tl.load(x_base + oi, mask=mi, other=0.0)
        y = tl.load(x_base + oj, mask=mj, other=0.0)
        aa = tl.dot(x.to(DOT), tl.trans(y).to(DOT), aa, input_precision=PRECISION)

    g_base = g_ptr + sample.to(tl.int64) * s_gb + (grp * P).to(tl.int64) * s_gc
    gg = _gram_tile(g_base, rows_i, rows_j, mask_i, mask_j, P, s_gt, s_gc, ACC, PRECISION, DOT, BLOCK_T, BLOCK_K)
    _store_ghost(w_ptr, b_ptr, pid, aa, gg, i, j, HAS_BIAS)


@triton.jit
def _conv_inst_kernel(
    x_ptr,
    g_ptr,
    w_ptr,  # (B * groups * n_tiles,) partial weight norms
    b_ptr,  # (B * groups * n_tiles,) partial bias norms
    T,
    D,
    P,
    CIN_G,
    groups,
    n_tiles_d,
    n_tiles,  # p-tiles x d-tiles per (sample, group)
    O_H,
    O_W,
    S_D,
    S_H,
    S_W,
    KK,
    K_H,
    K_W,
    ST_D,
    ST_H,
    ST_W,
    PAD_D,
    PAD_H,
    PAD_W,
    DIL_D,
    DIL_H,
    DIL_W,
    s_xb,
    s_xc,
    s_xd,
    s_xh,
    s_xw,
    s_gb,
    s_gc,
    s_gt,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NDIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,  # chunk of the T reduction
):
    pid = tl.program_id(0)
    sg = pid // n_tiles
    sample = sg // groups
    grp = sg - sample * groups
    offs_p, mask_p, offs_d, mask_d, tile_d = tile_ranges(pid - sg * n_tiles, n_tiles_d, P, D, BLOCK_P, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    ch, kd, kh, kw = _taps(offs_d, KK, K_H, K_W, DIL_D, DIL_H, DIL_W, NDIM)  # the columns stay: once
    x_base = x_ptr + sample.to(tl.int64) * s_xb + (grp * CIN_G).to(tl.int64) * s_xc
    g_base = g_ptr + sample.to(tl.int64) * s_gb + (grp * P).to(tl.int64) * s_gc

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)  # tile of G^T A, never written out
    bacc = tl.zeros((BLOCK_P,), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + offs_t
        mask_t = rows < T
        g = tl.load(
            g_base + rows[:, None] * s_gt + offs_p[None, :] * s_gc, mask=mask_t[:, None] & mask_p[None, :], other=0.0
        )
        wd, wh, ww = _window(rows, O_H, O_W, ST_D, ST_H, ST_W, PAD_D, PAD_H, PAD_W, NDIM)
        oa, ma = _gather(wd, wh, ww, mask_t, ch, kd, kh, kw, mask_d, S_D, S_H, S_W, s_xc, s_xd, s_xh, s_xw, NDIM)
        a = tl.load(x_base + oa, mask=ma, other=0.0)
        acc, bacc = _inst_step(acc, bacc, g, a, tile_d, ACC, PRECISION, DOT, HAS_BIAS)
    _store_inst(w_ptr, b_ptr, pid, acc, bacc, HAS_BIAS)


@triton.jit
def _conv_clipped_sum_kernel(
    x_ptr,
    g_ptr,
    c_ptr,
    w_ptr,  # (C_out, D) output, or (S, C_out, D) workspace when SPLIT
    b_ptr,  # (C_out,) output, or (S, C_out) workspace when SPLIT
    prev_w_ptr,
    prev_b_ptr,
    T,
    D,
    P,  # C_out/groups
    CIN_G,
    C_OUT,
    K,  # B * T, the reduction length
    k_per_split,  # rows per split, a multiple of BLOCK_K
    n_tiles_p,  # p-tiles per group
    O_H,
    O_W,
    S_D,
    S_H,
    S_W,
    KK,
    K_H,
    K_W,
    ST_D,
    ST_H,
    ST_W,
    PAD_D,
    PAD_H,
    PAD_W,
    DIL_D,
    DIL_H,
    DIL_W,
    s_xb,
    s_xc,
    s_xd,
    s_xh,
    s_xw,
    s_gb,
    s_gc,
    s_gt,
    noise_std,
    scale,
    seed_w,
    seed_b,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT: tl.constexpr,
    FP16: tl.constexpr,  # fp16 operands: c_i g_it block-scaled into fp16's range (_common.fp16_block_scale)
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,  # write raw partial sums to the workspace; the finish kernel does the epilogue
    HAS_PREV_W: tl.constexpr,
    HAS_PREV_B: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    WIDE: tl.constexpr,  # C_out * D >= 2**31: int64 output offsets (see add_noise.py)
    NDIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPI_ROWS: tl.constexpr,  # rows of the output tile per slice of the noise epilogue
):
    pid_gp = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    grp = pid_gp // n_tiles_p
    tile_p = pid_gp - grp * n_tiles_p
    offs_q = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_q < P
    chan = grp * P + offs_q  # output channels of this tile
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    ch, kd, kh, kw = _taps(offs_d, KK, K_H, K_W, DIL_D, DIL_H, DIL_W, NDIM)
    x_grp = x_ptr + (grp * CIN_G).to(tl.int64) * s_xc

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
    bacc = tl.zeros((BLOCK_P,), dtype=ACC)
    acc_scale = tl.full((), FP16_SCALE_START, tl.float32)  # acc holds the sum times this (FP16 only)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        mask_k = rows < k_hi
        gc, sample, t, keep = clipped_rows(g_ptr, c_ptr, rows, mask_k, T, s_gb, s_gt, chan, mask_p, s_gc, ACC)
        wd, wh, ww = _window(t, O_H, O_W, ST_D, ST_H, ST_W, PAD_D, PAD_H, PAD_W, NDIM)
        # rows with c_i = 0: their patches not loaded either (0 * inf is NaN), see clipped_rows
        oa, ma = _gather(wd, wh, ww, keep, ch, kd, kh, kw, mask_d, S_D, S_H, S_W, s_xc, s_xd, s_xh, s_xw, NDIM)
        a = tl.load(x_grp + sample.to(tl.int64)[:, None] * s_xb + oa, mask=ma, other=0.0)
        x = gc
        if FP16:  # keep c_i g_it in fp16's range: see _common.fp16_block_scale
            s = fp16_block_scale(gc, acc_scale)
            if s < acc_scale:
                acc = acc * (s / acc_scale)
                acc_scale = s
            x = gc * acc_scale
        acc = tl.dot(tl.trans(x.to(a.dtype)).to(DOT), a.to(DOT), acc, input_precision=PRECISION)
        if HAS_BIAS and pid_d == 0:  # the first column of programs also sums the bias
            bacc += tl.sum(gc, axis=0)
    if FP16:
        acc = acc * (1.0 / acc_scale)

    _store_tile(
        w_ptr,
        acc,
        grp * P,
        tile_p * BLOCK_P,
        P,
        C_OUT,
        offs_d,
        mask_d,
        D,
        pid_s,
        prev_w_ptr,
        noise_std,
        scale,
        seed_w,
        HAS_PREV_W,
        HAS_NOISE,
        SPLIT,
        WIDE,
        BLOCK_P,
        EPI_ROWS,
    )
    if HAS_BIAS:
        _store_vector(
            b_ptr,
            bacc,
            chan,
            mask_p,
            pid_d == 0,
            pid_s,
            C_OUT,
            prev_b_ptr,
            noise_std,
            scale,
            seed_b,
            HAS_PREV_B,
            HAS_NOISE,
            SPLIT,
        )


# ----------------------------------------------------------------------------- configs


def _gather_k_block(dtype: torch.dtype) -> int:
    """The reduction chunk: 32 rows of 16-bit inputs, 16 of 4- and 8-byte ones, below _common.k_block's.
    A gathered tile has no contiguity for the compiler to vectorise, so each element holds its own
    64-bit address and mask: with linear's chunks 128x128 tiles spill (ptxas for sm_90: 255 registers
    and 32-450 B of spills on conv1d k=5 and 1x1 convs); with these, none spills (<= 255 registers)."""
    return 32 if dtype.itemsize == 2 else 16


def ghost_config(T: int, d: int, p: int, dtype: torch.dtype) -> dict:
    """The Linear ghost kernel's 64x64 Gram tiles with the conv reduction chunk: two gathered tiles of
    64 rows per step (16-bit: 90-245 registers, no spills)."""
    return gram_tile_config(T, max(d, p), _gather_k_block(dtype), dtype)


def inst_config(T: int, d: int, p: int, dtype: torch.dtype) -> dict:
    """Output tiles up to 128x128 (FMA dots: 64x64), as linear_norms.inst_config; conv layers often
    have a small p = C_out/groups, and the tile shrinks to it."""
    bt = block(T, 16, _gather_k_block(dtype))
    return matmul_config(p, d, bt, dtype, k_name="BLOCK_T", gathered=True)


def clipped_sum_config(p: int, d: int, dtype: torch.dtype) -> dict:
    """Output tiles up to 128x128 (FMA dots: 64x64), as linear_clipped_sum.config, with the conv
    reduction chunk."""
    return matmul_config(p, d, _gather_k_block(dtype), dtype, gathered=True)


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ConvGeometry:
    """A conv's shapes as the kernels see them: spatial dims padded to 3 in front (size 1, kernel 1)."""

    ndim: int
    B: int
    c_in: int
    c_out: int
    groups: int
    T: int  # output positions
    D: int  # C_in/groups * prod(k)
    P: int  # C_out/groups
    kernel_size: tuple[int, ...]
    args: tuple[int, ...]  # O_H .. DIL_W, the kernels' index arguments, then x's strides s_xb .. s_xw

    def unsupported(self, x: Tensor, g: Tensor) -> str | None:
        """Why the kernels cannot take this case (the wrappers then call the reference), or None."""
        if self.ndim > 3:
            return f"{self.ndim} spatial dims"
        if self.c_in == 0 or self.c_out == 0:
            return "no channels"
        for name, t in (("x", x), ("g", g)):
            span = sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:], strict=True))
            if span >= INT32:
                return f"a sample of {name} spans >= 2**31 elements"
        return None


def _ntuple(v: IntOrSeq, n: int, name: str, op: str) -> tuple[int, ...]:
    """An int, or one int per spatial dim (a single one repeated), as torch's conv layers take them."""
    if isinstance(v, int):
        return (v,) * n
    t = tuple(int(e) for e in v)
    if len(t) == 1:
        t = t * n
    if len(t) != n:
        raise ValueError(f"{op}: {name} must be an int or {n} ints for a {n}-d convolution, got {tuple(v)}")
    return t


def geometry(
    op: str,
    x: Tensor,
    g: Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq,
    padding: IntOrSeq,
    dilation: IntOrSeq,
    groups: int,
) -> ConvGeometry:
    """Lay out the geometry of x (B, C_in, *S) and g (B, C_out, *out) for the kernels; the dispatcher
    has checked that they fit it (ops._validate)."""
    n = x.dim() - 2
    k = _ntuple(kernel_size, n, "kernel_size", op)
    s = _ntuple(stride, n, "stride", op)
    pad = _ntuple(padding, n, "padding", op)
    dil = _ntuple(dilation, n, "dilation", op)
    B, c_in, c_out = x.shape[0], x.shape[1], g.shape[1]
    S = tuple(x.shape[2:])
    out = [(S[i] + 2 * pad[i] - dil[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(n)]
    T = math.prod(out)
    lead = max(0, 3 - n)
    O3 = (1,) * lead + tuple(out)
    S3 = (1,) * lead + S
    k3 = (1,) * lead + k
    s3 = (1,) * lead + s
    p3 = (0,) * lead + pad
    d3 = (1,) * lead + dil
    xs = x.stride()
    sx3 = (0,) * lead + tuple(xs[2:])  # absent dims are never addressed
    args = (O3[-2], O3[-1], *S3[-3:], math.prod(k), k3[-2], k3[-1], *s3[-3:], *p3[-3:], *d3[-3:])
    args += (xs[0], xs[1], *sx3[-3:])
    return ConvGeometry(
        ndim=n,
        B=B,
        c_in=c_in,
        c_out=c_out,
        groups=groups,
        T=T,
        D=c_in // groups * math.prod(k),
        P=c_out // groups,
        kernel_size=k,
        args=args,
    )


# ----------------------------------------------------------------------------- host side


def _launch_norms(kernel, cfg: dict, x: Tensor, g: Tensor, dt: torch.dtype, geo: ConvGeometry, bias: bool, n, tiles):
    """One program per (sample, group, one of its n tiles), each writing its partial norms."""
    gr = g.reshape(geo.B, geo.c_out, geo.T)
    w, b = (output(x, (geo.B, geo.groups * n), dt), output(x, (geo.B, geo.groups * n), dt, bias))
    if geo.B * geo.groups * n > 0:
        launch(
            kernel,
            (geo.B * geo.groups * n,),
            x,
            gr,
            w,
            b,
            geo.T,
            geo.D,
            geo.P,
            geo.c_in // geo.groups,
            geo.groups,
            *tiles,
            *geo.args,
            *gr.stride(),
            ACC=acc_tl(dt),
            PRECISION=dot_precision(x.dtype),
            DOT=dot_operand(kernel, x.dtype),
            HAS_BIAS=bias,
            NDIM=geo.ndim,
            **cfg,
        )
    return per_sample(w), per_sample(b)


def launch_ghost(
    x: Tensor,
    g: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    bias: bool,
) -> tuple[Tensor, Tensor]:
    (x, g), dt = cast_inputs("conv_norms", x, g)
    geo = geometry("conv_norms", x, g, kernel_size, stride, padding, dilation, groups)
    cfg = ghost_config(geo.T, geo.D, geo.P, x.dtype)
    n_tiles, n_pairs = ghost_pairs("conv_norms", geo.T, cfg["BLOCK_T"])
    return _launch_norms(_conv_ghost_kernel, cfg, x, g, dt, geo, bias, n_pairs, (n_tiles, n_pairs))


def launch_inst(
    x: Tensor,
    g: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    bias: bool,
) -> tuple[Tensor, Tensor]:
    (x, g), dt = cast_inputs("conv_norms", x, g)
    geo = geometry("conv_norms", x, g, kernel_size, stride, padding, dilation, groups)
    cfg = inst_config(geo.T, geo.D, geo.P, x.dtype)
    n_tiles_d = triton.cdiv(geo.D, cfg["BLOCK_D"])
    n_tiles = triton.cdiv(geo.P, cfg["BLOCK_P"]) * n_tiles_d
    return _launch_norms(_conv_inst_kernel, cfg, x, g, dt, geo, bias, n_tiles, (n_tiles_d, n_tiles))


def launch_clipped_sum(
    x: Tensor,
    g: Tensor,
    c: Tensor,
    weight_shape: Sequence[int],
    stride: IntOrSeq,
    padding: IntOrSeq,
    dilation: IntOrSeq,
    groups: int,
    bias: bool,
    noise_std: float,
    scale: float,
    seed_w: int,
    seed_b: int,
    prev_w: Tensor | None,
    prev_b: Tensor | None,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The host side of conv_clipped_sum; ``splits`` forces the split-K factor (the tests cover
    both paths with it). Returns (weight, bias or an empty tensor)."""
    (x, g), dt = cast_inputs("conv_clipped_sum", x, g)
    geo = geometry("conv_clipped_sum", x, g, tuple(weight_shape[2:]), stride, padding, dilation, groups)
    gr = g.reshape(geo.B, geo.c_out, geo.T)
    w, b = output(x, tuple(weight_shape), dt), output(x, (geo.c_out,), dt, bias)
    cfg = clipped_sum_config(geo.P, geo.D, x.dtype)
    bp, bd, bk = cfg.pop("BLOCK_P"), cfg.pop("BLOCK_D"), cfg.pop("BLOCK_K")
    K = geo.B * geo.T
    n_tiles_p = triton.cdiv(geo.P, bp)
    grid_d = triton.cdiv(geo.D, bd)
    rs = RowSplit.plan(groups * n_tiles_p * grid_d, K, bk, x.device, splits)
    ws_w, ws_b = rs.target(w), rs.target(b, bias)
    launch(
        _conv_clipped_sum_kernel,
        (groups * n_tiles_p, grid_d, rs.n),
        x,
        gr,
        c.contiguous(),
        ws_w,
        ws_b,
        given_or(prev_w, w),
        given_or(prev_b, b),
        geo.T,
        geo.D,
        geo.P,
        geo.c_in // groups,
        geo.c_out,
        K,
        rs.k_per,
        n_tiles_p,
        *geo.args,
        *gr.stride(),
        *epilogue_args(noise_std, scale, seed_w, seed_b),
        ACC=acc_tl(dt),
        PRECISION=dot_precision(x.dtype),
        DOT=dot_operand(_conv_clipped_sum_kernel, x.dtype),
        FP16=x.dtype == torch.float16,
        HAS_BIAS=bias,
        SPLIT=rs.split,
        HAS_PREV_W=prev_w is not None,
        HAS_PREV_B=prev_b is not None,
        HAS_NOISE=noise_std != 0.0,
        WIDE=geo.c_out * geo.D >= WIDE_OFFSETS,
        NDIM=geo.ndim,
        BLOCK_P=bp,
        BLOCK_D=bd,
        BLOCK_K=bk,
        EPI_ROWS=min(16, bp),
        **cfg,
    )
    rs.finish(ws_w, prev_w, w, noise_std=noise_std, scale=scale, seed=seed_w)
    rs.finish(ws_b, prev_b, b, noise_std=noise_std, scale=scale, seed=seed_b)
    return w, b


# ----------------------------------------------------------------------------- ops


def _norms_fake(x, g, kernel_size, stride, padding, dilation, groups, bias):
    dt, B = acc_dtype(x, g), x.shape[0]
    return output(x, (B,), dt), output(x, (B,), dt, bias)


_conv_norms_ghost_op = register_op("conv_norms_ghost", _norms_fake)(launch_ghost)
_conv_norms_inst_op = register_op("conv_norms_inst", _norms_fake)(launch_inst)


def _clipped_sum_fake(x, g, c, weight_shape, stride, padding, dilation, groups, bias, *epilogue):
    dt = acc_dtype(x, g)
    return output(x, tuple(weight_shape), dt), output(x, (g.shape[1],), dt, bias)


@register_op("conv_clipped_sum", _clipped_sum_fake)
def _conv_clipped_sum_op(
    x: Tensor,
    g: Tensor,
    c: Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    bias: bool,
    noise_std: float,
    scale: float,
    seed_w: int,
    seed_b: int,
    prev_w: Tensor | None,
    prev_b: Tensor | None,
) -> tuple[Tensor, Tensor]:
    return launch_clipped_sum(
        x, g, c, weight_shape, stride, padding, dilation, groups, bias, noise_std, scale, seed_w, seed_b, prev_w, prev_b
    )


def _lists(x: Tensor, kernel_size, stride, padding, dilation) -> tuple[list[int], ...]:
    n = x.dim() - 2
    return tuple(
        list(_ntuple(v, n, name, "conv"))
        for v, name in ((kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding"), (dilation, "dilation"))
    )


def conv_norms(
    x: Tensor,
    g: Tensor,
    *,
    kernel_size: IntOrSeq,
    stride: IntOrSeq,
    padding: IntOrSeq,
    dilation: IntOrSeq,
    groups: int,
    bias: bool,
    method: str,
) -> tuple[Tensor, Tensor | None]:
    """Per-sample squared norms of a Conv1d/2d/3d layer's weight and bias gradients, by implicit GEMM.

    weight: sum_j ||G_ij^T A_ij||_F^2 over groups j, A = unfold(x) gathered tile by tile in the kernel
            ("ghost": <A A^T, G G^T>, "inst": sum (G^T A)^2; see linear_norms)
    bias:   ||sum_t g_t||^2
    x: (B, C_in, *S), zero-padded by ``padding``; g: (B, C_out, *out). Returns float32 (float64 for
    float64 inputs) tensors of shape (B,). Cases the kernels do not take (more than 3 spatial dims,
    no channels, a sample of >= 2**31 elements) are computed by the reference op (ops.reference.conv).
    """
    common_input("conv_norms", x, g)
    geom = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    geo = geometry("conv_norms", x, g, **geom, groups=groups)
    if geo.unsupported(x, g):
        return ref_conv.conv_norms(x, g, **geom, groups=groups, bias=bias, method=method)
    op = _conv_norms_ghost_op if method == "ghost" else _conv_norms_inst_op
    w, b = op(x, g, *_lists(x, **geom), groups, bias)
    return w, (b if bias else None)


def conv_clipped_sum(
    x: Tensor,
    g: Tensor,
    c: Tensor,
    *,
    weight_shape: Sequence[int],
    stride: IntOrSeq,
    padding: IntOrSeq,
    dilation: IntOrSeq,
    groups: int,
    bias: bool,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed_w: int = 0,
    seed_b: int = 0,
    prev_w: Tensor | None = None,
    prev_b: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Clipped, summed, noised Conv gradients: one implicit-GEMM matmul over the B*T rows.

    weight: scale * (prev_w + sum_i c_i G_i^T unfold(x_i) + noise_std * z_w)   weight_shape (C_out, C_in/g, *k)
    bias:   scale * (prev_b + sum_i c_i sum_t g_it + noise_std * z_b)          (C_out,)
    c_i is folded into G's rows as they load; z is the in-kernel Philox noise of add_noise (a function of
    the seed and the output's shape). float32 results (float64 for float64 inputs). Cases the kernels do
    not take (more than 3 spatial dims, no channels, a sample of >= 2**31 elements, B*T >= 2**31 rows)
    are computed by the reference op (ops.reference.conv), whose noise is torch.Generator's.
    """
    op = "conv_clipped_sum"
    common_input(op, x, g)
    weight_shape = tuple(int(v) for v in weight_shape)
    geom = dict(stride=stride, padding=padding, dilation=dilation)
    geo = geometry(op, x, g, weight_shape[2:], **geom, groups=groups)
    if geo.unsupported(x, g) or geo.B * geo.T >= INT32:
        return ref_conv.conv_clipped_sum(
            x,
            g,
            c,
            weight_shape=weight_shape,
            **geom,
            groups=groups,
            bias=bias,
            noise_std=noise_std,
            scale=scale,
            seed_w=seed_w,
            seed_b=seed_b,
            prev_w=prev_w,
            prev_b=prev_b,
        )
    _, s, p, d = _lists(x, weight_shape[2:], **geom)
    w, b = _conv_clipped_sum_op(
        x,
        g,
        c,
        list(weight_shape),
        s,
        p,
        d,
        groups,
        bias,
        *epilogue_args(noise_std, scale, seed_w, seed_b),
        prev_w,
        prev_b,
    )
    return w, (b if bias else None)


# ----------------------------------------------------------------------------- certified bounds


def conv_norms_bound(
    x: Tensor,
    g: Tensor,
    *,
    kernel_size: IntOrSeq,
    stride: IntOrSeq,
    padding: IntOrSeq,
    dilation: IntOrSeq,
    groups: int,
    bias: bool,
    method: str,
) -> tuple[Bound, Bound | None]:
    """Bounds (dpkernels/ops/bounds.py) of conv_norms' per-sample squared norms, by the Linear kernels'
    own bounds (`linear_norms.linear_norms_bound`, ghost or inst as ``method``) on the unfolded rows.

    A conv's weight gradient of sample i is sum_j over groups of the Linear gradient G_ij^T A_ij of its
    (sample, group) row block (`reference.conv.conv_rows`: A_ij the unfolded input windows, zero where
    a window covers the padding; G_ij the group's output gradient rows). Unfolding only copies stored
    values (and zeros), so A_ij, G_ij are exactly the tensors whose Linear norms the kernels bound, and
    the exact squared norm is the sum over groups of those norms (disjoint blocks), bounded by the
    blocks' bounds summed (`Bound.group_sum`: the signed values' float64 rounding goes into err).
    Bias: ||sum_t g_t||^2 by `affine.sum_bound` on g's (T, C_out) rows.

    The unfolded rows are a (B groups, T, C_in/groups prod(k)) copy of x in its dtype, prod(k) times
    x's size, as the generic certificate made (for its token norms); the norm kernels themselves gather
    windows in place (implicit GEMM), the bound kernels do not yet. float64 inputs and empty
    dimensions (and unfolded samples of >= 2**31 elements): the reference's bounds."""
    geom: dict = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups)
    if not tight(x, g):
        return _ref_bounds.conv_norms_bound(x, g, **geom, bias=bias, method=method)
    (x, g), _ = cast_inputs("conv_norms", x, g)
    a, rows = ref_conv.conv_rows(x, g, **geom)
    if a.numel() == 0 or rows.numel() == 0 or a[0].numel() >= INT32:  # the kernels' offsets are int32 a sample
        return _ref_bounds.conv_norms_bound(x, g, **geom, bias=bias, method=method)
    w, _ = linear_norms_bound(a, rows, bias=False, method=method)
    if groups > 1:
        w = w.group_sum(groups)
    return w, (bias_norms_bound(g.flatten(2).transpose(1, 2)) if bias else None)
