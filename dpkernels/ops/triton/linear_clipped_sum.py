"""Clipped, summed, noised Linear (and bias) gradients in one matmul with a fused epilogue.

    W = scale * (prev_w + sum_i c_i G_i^T A_i + noise_std * z_w)          (p, d)
      = scale * (prev_w + G'^T A + noise_std * z_w),  G'[(i, t), :] = c_i g_it
    b = scale * (prev_b + sum_i c_i sum_t g_it + noise_std * z_b)         (p,)

One matmul over the (B*T) reduction: the clip factor c_i is folded into G's rows as
each tile is loaded (no pass over G to scale it: DESIGN.md speed lever 1); the bias is
the column sum of the same scaled G tiles, taken by the programs of the first d-tile, so
G is read once for both. The epilogue adds prev, the Philox noise (see add_noise.py) and
the scale, and writes the gradient once. When the output has too few tiles to fill the
GPU, the reduction is split over programs (split-K) into a float32 workspace that the
finish kernel sums in a fixed order before the same epilogue: results are deterministic.

Operands are multiplied in the input dtype (c_i g_it rounded once to it for 16-bit
inputs, as tensor cores need) and accumulated in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    NS,
    SEED_MASK,
    acc_dtype,
    block,
    check_prev,
    check_rows,
    common_input,
    dot_operand,
    dot_precision,
    launch,
    num_sms,
)
from .add_noise import WIDE_OFFSETS, _epilogue, finish


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
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        mask_k = rows < k_hi
        sample = rows // T
        t = rows - sample * T
        c = tl.load(c_ptr + sample, mask=mask_k, other=0.0).to(ACC)
        g_rows = sample.to(tl.int64) * s_gb + t.to(tl.int64) * s_gt
        g = tl.load(g_ptr + g_rows[:, None] + offs_p[None, :] * s_gp, mask=mask_k[:, None] & mask_p[None, :], other=0.0)
        gc = g.to(ACC) * c[:, None]  # the clip factor folded into G's rows, (BLOCK_K, BLOCK_P)
        if HAS_WEIGHT:
            a_rows = sample.to(tl.int64) * s_ab + t.to(tl.int64) * s_at
            a = tl.load(
                a_ptr + a_rows[:, None] + offs_d[None, :] * s_ad, mask=mask_k[:, None] & mask_d[None, :], other=0.0
            )
            acc = tl.dot(tl.trans(gc.to(a.dtype)).to(DOT), a.to(DOT), acc, input_precision=PRECISION)
        if HAS_BIAS and pid_d == 0:  # the first column of programs also sums the bias
            bacc += tl.sum(gc, axis=0)

    out_offs = offs_p[:, None] * D + offs_d[None, :]
    if WIDE:
        out_offs = offs_p.to(tl.int64)[:, None] * D + offs_d[None, :]
    out_mask = mask_p[:, None] & mask_d[None, :]
    if SPLIT:
        if HAS_WEIGHT:
            part = pid_s.to(tl.int64) * P * D
            tl.store(w_ptr + part + out_offs, acc, mask=out_mask)
        if HAS_BIAS:
            tl.store(b_ptr + pid_s * P + offs_p, bacc, mask=mask_p & (pid_d == 0))
    else:
        if HAS_WEIGHT:
            if HAS_NOISE:
                # Philox over a whole 128x128 accumulator at once needs more registers than a thread
                # has (ptxas for sm_90: 255 registers and ~900 B of spills). So the raw tile goes out
                # and the epilogue runs over it in EPI_ROWS-row slices, re-read from L1/L2 where this
                # program just wrote it (bar.sync makes the writes visible across its threads).
                tl.store(w_ptr + out_offs, acc, mask=out_mask)
                tl.debug_barrier()
                for r0 in range(0, BLOCK_P, EPI_ROWS):
                    rows = pid_p * BLOCK_P + r0 + tl.arange(0, EPI_ROWS)
                    offs = rows[:, None] * D + offs_d[None, :]
                    if WIDE:
                        offs = rows.to(tl.int64)[:, None] * D + offs_d[None, :]
                    mask = (rows < P)[:, None] & mask_d[None, :]
                    x = tl.load(w_ptr + offs, mask=mask, other=0.0)
                    x = _epilogue(x, offs, mask, prev_w_ptr, noise_std, scale, seed_w, HAS_PREV_W, True, WIDE)
                    tl.store(w_ptr + offs, x, mask=mask)
            else:
                acc = _epilogue(acc, out_offs, out_mask, prev_w_ptr, noise_std, scale, seed_w, HAS_PREV_W, False, WIDE)
                tl.store(w_ptr + out_offs, acc, mask=out_mask)
        if HAS_BIAS and pid_d == 0:
            bacc = _epilogue(bacc, offs_p, mask_p, prev_b_ptr, noise_std, scale, seed_b, HAS_PREV_B, HAS_NOISE, False)
            tl.store(b_ptr + offs_p, bacc, mask=mask_p)


def config(p: int, d: int, dtype: torch.dtype, weight: bool = True) -> dict:
    """Block sizes and warps for a (p, d) output. 128x128 output tiles with 8 warps keep
    an H100's wgmma busy on 16-bit inputs; K tiles of 64 rows of 16-bit inputs, 32 of 4-byte
    and 16 of 8-byte ones keep three stages of operand tiles within shared memory (AOT report:
    bench/aot_compile.py); small layers shrink the tiles to their size."""
    if not weight:  # bias alone: a (BLOCK_K x BLOCK_P) tile of G, 32 fp32 registers a thread on 4 warps
        return dict(BLOCK_P=block(p, 16, 128), BLOCK_D=16, BLOCK_K=32, num_warps=4, num_stages=2)
    bp, bd = block(p, 16, 128), block(d, 16, 128)
    return dict(
        BLOCK_P=bp,
        BLOCK_D=bd,
        BLOCK_K={2: 64, 4: 32}.get(dtype.itemsize, 16),
        num_warps=8 if bp * bd >= 128 * 128 else 4,
        num_stages=3,
    )


def plan_splits(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """Split the reduction only when the output tiles cannot fill the GPU (two waves of
    programs), and never below 8 K-tiles per split, where the extra workspace pass and
    the finish kernel would cost more than the parallelism gains."""
    k_tiles = triton.cdiv(k, block_k)
    want = triton.cdiv(2 * num_sms(device), max(1, tiles))
    return max(1, min(want, k_tiles // 8, 64))


def launch_clipped_sum(
    a: Tensor | None,
    g: Tensor,
    c: Tensor,
    *,
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
    B, T, p = g.shape
    d = a.shape[2] if a is not None else 0
    dt = acc_dtype(*(x for x in (a, g) if x is not None))
    in_dt = common_input("linear_clipped_sum", *(x for x in (a, g) if x is not None))
    g = g.to(in_dt)
    a = a.to(in_dt) if a is not None else None
    weight = a is not None
    w = torch.empty((p, d) if weight else (0,), device=g.device, dtype=dt)
    b = torch.empty((p,) if bias else (0,), device=g.device, dtype=dt)
    if p == 0 or (weight and d == 0 and not bias):
        return w, b
    cfg = config(p, d, in_dt, weight)
    bp, bd, bk = cfg.pop("BLOCK_P"), cfg.pop("BLOCK_D"), cfg.pop("BLOCK_K")
    K = B * T
    grid_d = triton.cdiv(d, bd) if weight else 1
    grid_d = max(grid_d, 1)  # d == 0 with a bias: one column of programs for the bias
    tiles = triton.cdiv(p, bp) * grid_d
    s = plan_splits(tiles, K, bk, g.device) if splits is None else max(1, min(splits, triton.cdiv(max(K, 1), bk)))
    k_per = triton.cdiv(triton.cdiv(max(K, 1), bk), s) * bk
    s = triton.cdiv(max(K, 1), k_per)
    split = s > 1
    ws_w = torch.empty((s, p, d) if split and weight else (0,), device=g.device, dtype=dt)
    ws_b = torch.empty((s, p) if split and bias else (0,), device=g.device, dtype=dt)
    a_arg = a if a is not None else g  # stands for the absent input; never read (HAS_WEIGHT False)
    sa = a.stride() if a is not None else (0, 0, 0)
    launch(
        _clipped_sum_kernel,
        (triton.cdiv(p, bp), grid_d, s),
        a_arg,
        g,
        c.contiguous(),
        ws_w if split and weight else w,
        ws_b if split and bias else b,
        prev_w.contiguous() if prev_w is not None else w,
        prev_b.contiguous() if prev_b is not None else b,
        T,
        d,
        p,
        K,
        k_per,
        *sa,
        *g.stride(),
        float(noise_std),
        float(scale),
        int(seed_w) & SEED_MASK,
        int(seed_b) & SEED_MASK,
        ACC=tl.float64 if dt == torch.float64 else tl.float32,
        PRECISION=dot_precision(in_dt),
        DOT=dot_operand(_clipped_sum_kernel, in_dt),
        HAS_WEIGHT=weight and d > 0,
        HAS_BIAS=bias,
        SPLIT=split,
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
    if split:
        if weight:
            finish(ws_w, prev_w, w, noise_std=noise_std, scale=scale, seed=seed_w)
        if bias:
            finish(ws_b, prev_b, b, noise_std=noise_std, scale=scale, seed=seed_b)
    return w, b


@torch.library.custom_op(f"{NS}::triton_linear_clipped_sum", mutates_args=())
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
    return launch_clipped_sum(
        a,
        g,
        c,
        bias=bias,
        noise_std=noise_std,
        scale=scale,
        seed_w=seed_w,
        seed_b=seed_b,
        prev_w=prev_w,
        prev_b=prev_b,
    )


@_linear_clipped_sum_op.register_fake
def _(a, g, c, bias, noise_std, scale, seed_w, seed_b, prev_w, prev_b):
    dt = acc_dtype(a, g)
    p, d = g.shape[2], a.shape[2]
    return g.new_empty((p, d), dtype=dt), g.new_empty((p,) if bias else (0,), dtype=dt)


@torch.library.custom_op(f"{NS}::triton_bias_clipped_sum", mutates_args=())
def _bias_clipped_sum_op(
    g: Tensor, c: Tensor, noise_std: float, scale: float, seed: int, prev: Tensor | None
) -> Tensor:
    _, b = launch_clipped_sum(
        None, g, c, bias=True, noise_std=noise_std, scale=scale, seed_w=0, seed_b=seed, prev_w=None, prev_b=prev
    )
    return b


@_bias_clipped_sum_op.register_fake
def _(g, c, noise_std, scale, seed, prev):
    return g.new_empty((g.shape[2],), dtype=acc_dtype(g))


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
    check_rows("linear_clipped_sum", a, g, c)
    check_prev("linear_clipped_sum", "prev_w", prev_w, (g.shape[2], a.shape[2]), g.device)
    check_prev("linear_clipped_sum", "prev_b", prev_b, (g.shape[2],), g.device)
    w, b = _linear_clipped_sum_op(
        a, g, c, bias, float(noise_std), float(scale), int(seed_w) & SEED_MASK, int(seed_b) & SEED_MASK, prev_w, prev_b
    )
    return w, (b if bias else None)


def bias_clipped_sum(
    g: Tensor, c: Tensor, *, noise_std: float = 0.0, scale: float = 1.0, seed: int = 0, prev: Tensor | None = None
) -> Tensor:
    """scale * (prev + sum_i c_i sum_t g_it + noise_std * z), g: (B, T, p), c: (B,)."""
    check_rows("bias_clipped_sum", None, g, c)
    check_prev("bias_clipped_sum", "prev", prev, (g.shape[2],), g.device)
    return _bias_clipped_sum_op(g, c, float(noise_std), float(scale), int(seed) & SEED_MASK, prev)
