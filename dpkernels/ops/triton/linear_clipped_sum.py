"""Clipped, summed, noised Linear (and bias) gradients in one matmul with a fused epilogue.

    W = scale * (prev_w + sum_i c_i G_i^T A_i + noise_std * z_w)          (p, d)
      = scale * (prev_w + G'^T A + noise_std * z_w),  G'[(i, t), :] = c_i g_it
    b = scale * (prev_b + sum_i c_i sum_t g_it + noise_std * z_b)         (p,)

One matmul over the (B*T) reduction: the clip factor c_i is folded into G's rows as
each tile is loaded (no pass over G to scale it: docs/design.md, speed lever 1); the bias is
the column sum of the same scaled G tiles, taken by the programs of the first d-tile, so
G is read once for both. The epilogue adds prev, the Philox noise (see add_noise.py) and
the scale, and writes the gradient once. When the output has too few tiles to fill the
GPU, the reduction is split over programs (split-K) into a float32 workspace that the
finish kernel sums in a fixed order before the same epilogue: results are deterministic.

Operands are multiplied in the input dtype (c_i g_it rounded once to it for 16-bit
inputs, as tensor cores need) and accumulated in float32 (float64 for float64 inputs). For
fp16, whose range c_i g_it can leave (c_i > 1 overflows past 65504, c_i << 1 flushes to 0),
each tile of c_i g_it is first scaled by a power of two into range and the scale is undone
in the fp32 accumulator (block floating point, _common.fp16_block_scale); bf16 has fp32's
range and needs none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    FP16_SCALE_START,
    acc_dtype,
    acc_tl,
    block,
    cast_inputs,
    clipped_rows,
    dot_operand,
    dot_precision,
    epilogue_args,
    fp16_block_scale,
    given_or,
    k_block,
    launch,
    matmul_config,
    output,
    register_op,
)
from .add_noise import WIDE_OFFSETS, RowSplit, _store_tile, _store_vector


@triton.jit
def _clipped_sum_kernel(
    a_ptr,
    g_ptr,
    c_ptr,
    w_ptr,  # (p, d) output, or (S, p, d) workspace when SPLIT
    b_ptr,  # (p,) output, or (S, p) workspace when SPLIT
    prev_w_ptr,
    prev_b_ptr,
    T,
    D,
    P,
    K,  # B * T, the reduction length
    k_per_split,  # rows per split, a multiple of BLOCK_K
    s_ab,
    s_at,
    s_ad,
    s_gb,
    s_gt,
    s_gp,
    noise_std,
    scale,
    seed_w,
    seed_b,
    ACC: tl.constexpr,  # accumulation dtype: float32, float64 for float64 inputs
    PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" or "tf32"), see _common.dot_precision
    DOT: tl.constexpr,  # tl.dot operand dtype: the input's, see _common.dot_operand
    FP16: tl.constexpr,  # fp16 operands: c_i g_it block-scaled into fp16's range (_common.fp16_block_scale)
    HAS_WEIGHT: tl.constexpr,  # False: bias only (bias_clipped_sum), no A and no matmul
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,  # write raw partial sums to the workspace; the finish kernel does the epilogue
    HAS_PREV_W: tl.constexpr,
    HAS_PREV_B: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    WIDE: tl.constexpr,  # p * d >= 2**31: int64 offsets (see add_noise.py)
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EPI_ROWS: tl.constexpr,  # rows of the output tile per slice of the noise epilogue
):
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < P
    mask_d = offs_d < D

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
    bacc = tl.zeros((BLOCK_P,), dtype=ACC)
    acc_scale = tl.full((), FP16_SCALE_START, tl.float32)  # acc holds the sum times this (FP16 only)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        mask_k = rows < k_hi
        gc, sample, t, keep = clipped_rows(g_ptr, c_ptr, rows, mask_k, T, s_gb, s_gt, offs_p, mask_p, s_gp, ACC)
        if HAS_WEIGHT:  # rows with c_i = 0: A not loaded either (0 * inf is NaN), see clipped_rows
            a_rows = sample.to(tl.int64) * s_ab + t.to(tl.int64) * s_at
            a = tl.load(
                a_ptr + a_rows[:, None] + offs_d[None, :] * s_ad, mask=keep[:, None] & mask_d[None, :], other=0.0
            )
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

    if HAS_WEIGHT:
        if FP16:
            acc = acc * (1.0 / acc_scale)
        _store_tile(
            w_ptr,
            acc,
            0,
            pid_p * BLOCK_P,
            P,
            P,
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
            offs_p,
            mask_p,
            pid_d == 0,
            pid_s,
            P,
            prev_b_ptr,
            noise_std,
            scale,
            seed_b,
            HAS_PREV_B,
            HAS_NOISE,
            SPLIT,
        )


def config(p: int, d: int, dtype: torch.dtype, weight: bool = True) -> dict:
    """Block sizes and warps for a (p, d) output. 128x128 output tiles with 8 warps keep
    an H100's wgmma busy on 16-bit inputs; K tiles of 64 rows of 16-bit inputs, 32 of 4-byte
    and 16 of 8-byte ones keep three stages of operand tiles within shared memory (AOT report:
    bench/aot_compile.py); small layers shrink the tiles to their size, FMA dots take 64-row tiles
    (_common.matmul_config)."""
    if not weight:  # bias alone: a (BLOCK_K x BLOCK_P) tile of G, 32 fp32 registers a thread on 4 warps
        return dict(BLOCK_P=block(p, 16, 128), BLOCK_D=16, BLOCK_K=32, num_warps=4, num_stages=2)
    return matmul_config(p, d, k_block(dtype), dtype)


def launch_clipped_sum(
    a: Tensor | None,
    g: Tensor,
    c: Tensor,
    bias: bool,
    noise_std: float,
    scale: float,
    seed_w: int,
    seed_b: int,
    prev_w: Tensor | None,
    prev_b: Tensor | None,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The host side of both ops; ``a`` None for the bias alone. ``splits`` forces the split-K
    factor (tests cover both paths with it). Returns (weight or empty, bias or empty)."""
    weight = a is not None
    xs, dt = cast_inputs("linear_clipped_sum", *([a, g] if a is not None else [g]))
    a, g = (xs[0], xs[1]) if weight else (None, xs[0])
    B, T, p = g.shape
    d = a.shape[2] if a is not None else 0
    w, b = output(g, (p, d), dt, weight), output(g, (p,), dt, bias)
    if p == 0 or (weight and d == 0 and not bias):
        return w, b
    cfg = config(p, d, g.dtype, weight)
    bp, bd, bk = cfg.pop("BLOCK_P"), cfg.pop("BLOCK_D"), cfg.pop("BLOCK_K")
    grid_d = max(triton.cdiv(d, bd), 1)  # d == 0 with a bias (or no weight): one column of programs for the bias
    rs = RowSplit.plan(triton.cdiv(p, bp) * grid_d, B * T, bk, g.device, splits)
    ws_w, ws_b = rs.target(w, weight), rs.target(b, bias)
    launch(
        _clipped_sum_kernel,
        (triton.cdiv(p, bp), grid_d, rs.n),
        a if a is not None else g,  # g stands for the absent input; never read (HAS_WEIGHT False)
        g,
        c.contiguous(),
        ws_w,
        ws_b,
        given_or(prev_w, w),
        given_or(prev_b, b),
        T,
        d,
        p,
        B * T,
        rs.k_per,
        *(a.stride() if a is not None else (0, 0, 0)),
        *g.stride(),
        *epilogue_args(noise_std, scale, seed_w, seed_b),
        ACC=acc_tl(dt),
        PRECISION=dot_precision(g.dtype),
        DOT=dot_operand(_clipped_sum_kernel, g.dtype),
        FP16=g.dtype == torch.float16,
        HAS_WEIGHT=weight and d > 0,
        HAS_BIAS=bias,
        SPLIT=rs.split,
        HAS_PREV_W=prev_w is not None,
        HAS_PREV_B=prev_b is not None,
        HAS_NOISE=noise_std != 0.0,
        WIDE=p * d >= WIDE_OFFSETS,
        BLOCK_P=bp,
        BLOCK_D=bd,
        BLOCK_K=bk,
        EPI_ROWS=min(16, bp),
        **cfg,
    )
    rs.finish(ws_w, prev_w, w, noise_std=noise_std, scale=scale, seed=seed_w)
    rs.finish(ws_b, prev_b, b, noise_std=noise_std, scale=scale, seed=seed_b)
    return w, b


def _linear_fake(a, g, c, bias, *epilogue):
    dt, p = acc_dtype(a, g), g.shape[2]
    return output(g, (p, a.shape[2]), dt), output(g, (p,), dt, bias)


@register_op("linear_clipped_sum", _linear_fake)
def _linear_clipped_sum_op(
    a: Tensor,
    g: Tensor,
    c: Tensor,
    bias: bool,
    noise_std: float,
    scale: float,
    seed_w: int,
    seed_b: int,
    prev_w: Tensor | None,
    prev_b: Tensor | None,
) -> tuple[Tensor, Tensor]:
    return launch_clipped_sum(a, g, c, bias, noise_std, scale, seed_w, seed_b, prev_w, prev_b)


@register_op("bias_clipped_sum", lambda g, c, noise_std, scale, seed, prev: output(g, (g.shape[2],), acc_dtype(g)))
def _bias_clipped_sum_op(
    g: Tensor, c: Tensor, noise_std: float, scale: float, seed: int, prev: Tensor | None
) -> Tensor:
    return launch_clipped_sum(None, g, c, True, noise_std, scale, 0, seed, None, prev)[1]


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
    """Clipped, summed, noised Linear gradients, one fused kernel.

    weight: scale * (prev_w + sum_i c_i G_i^T A_i + noise_std * z_w)   (p, d)
    bias:   scale * (prev_b + sum_i c_i sum_t g_it + noise_std * z_b)  (p,)
    a: (B, T, d), g: (B, T, p), c: (B,). float32 results (float64 for float64 inputs).
    """
    w, b = _linear_clipped_sum_op(a, g, c, bias, *epilogue_args(noise_std, scale, seed_w, seed_b), prev_w, prev_b)
    return w, (b if bias else None)


def bias_clipped_sum(
    g: Tensor, c: Tensor, *, noise_std: float = 0.0, scale: float = 1.0, seed: int = 0, prev: Tensor | None = None
) -> Tensor:
    """scale * (prev + sum_i c_i sum_t g_it + noise_std * z), g: (B, T, p), c: (B,)."""
    return _bias_clipped_sum_op(g, c, *epilogue_args(noise_std, scale, seed), prev)
