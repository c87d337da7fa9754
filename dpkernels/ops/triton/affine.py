"""Affine parameters of LayerNorm, RMSNorm and GroupNorm: per-sample norms and the clipped sum.

y = xhat * w + b with xhat the normalised input, rows laid out as (B, T, C) (C the affine channels,
T every other non-batch position). Sample i's gradients are (C,) vectors, formed directly:

    gw_i = sum_t xhat_it * g_it,        gb_i = sum_t g_it
    norms:  ||gw_i||^2, ||gb_i||^2
    sum:    W = scale * (prev_w + sum_i c_i gw_i + noise_std * z_w),   b likewise with z_b

Norms: one program per (sample, C-tile) sums xhat * g and g over T in registers and writes the
tile's squared norms; the host sums a sample's C-tiles in a fixed order. The per-sample gradients
never reach memory. (A Linear bias norm is the affine bias norm: linear_norms uses `_channel_sums`.)

Clipped sum: one program per C-tile reduces all B*T rows, c_i folded into g as each tile loads,
then the shared noise epilogue (add_noise.py) writes W and b once. When the C-tiles cannot fill
the GPU (affine vectors are short: C = 768 is 6 tiles) the rows are split over programs into a
float32 workspace that add_noise.finish sums in a fixed order before the same epilogue, as the
Linear clipped sum does; results are deterministic either way.

Accumulation in float32 (float64 for float64 inputs); a product of two 16-bit values is exact in it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..bounds import U64, Bound, gamma, round_up_factor
from ..reference import bounds as _ref_bounds
from ._common import (
    acc_dtype,
    acc_tl,
    block,
    cast_inputs,
    clipped_rows,
    epilogue_args,
    given_or,
    launch,
    load_exact,
    output,
    per_sample,
    register_op,
)
from .add_noise import RowSplit, _store_vector

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _channel_sums(
    x_base,
    g_base,
    T,
    cols,
    mask_c,
    s_xt,
    s_xc,
    s_gt,
    s_gc,
    ACC: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(sum_t x_t g_t, sum_t g_t) over the columns ``cols`` of one sample's (T, C) rows; zeros for a sum
    not asked for. The (BLOCK_T, BLOCK_C) accumulators are reduced over rows once, after the loop."""
    offs_t = tl.arange(0, BLOCK_T)
    aw = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
    ab = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + offs_t
        mask = (rows < T)[:, None] & mask_c[None, :]
        g = tl.load(g_base + rows[:, None] * s_gt + cols[None, :] * s_gc, mask=mask, other=0.0).to(ACC)
        if HAS_W:
            x = tl.load(x_base + rows[:, None] * s_xt + cols[None, :] * s_xc, mask=mask, other=0.0).to(ACC)
            aw += x * g
        if HAS_B:
            ab += g
    return tl.sum(aw, axis=0), tl.sum(ab, axis=0)


@triton.jit
def _affine_norms_kernel(
    x_ptr,
    g_ptr,
    w_ptr,  # (B * n_tiles,) partial weight norms
    b_ptr,  # (B * n_tiles,) partial bias norms
    T,
    C,
    n_tiles,
    s_xb,
    s_xt,
    s_xc,
    s_gb,
    s_gt,
    s_gc,
    ACC: tl.constexpr,  # float32, float64 for float64 inputs
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """||sum_t xhat_t g_t||^2 and ||sum_t g_t||^2 over one C-tile of one sample."""
    pid = tl.program_id(0)
    sample = pid // n_tiles
    cols = (pid - sample * n_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_base = x_ptr + sample.to(tl.int64) * s_xb
    g_base = g_ptr + sample.to(tl.int64) * s_gb
    sw, sb = _channel_sums(
        x_base, g_base, T, cols, cols < C, s_xt, s_xc, s_gt, s_gc, ACC, HAS_W, HAS_B, BLOCK_T, BLOCK_C
    )
    if HAS_W:
        tl.store(w_ptr + pid, tl.sum(sw * sw))
    if HAS_B:
        tl.store(b_ptr + pid, tl.sum(sb * sb))


@triton.jit
def _affine_clipped_sum_kernel(
    x_ptr,
    g_ptr,
    c_ptr,
    w_ptr,  # (C,) output, or (S, C) workspace when SPLIT
    b_ptr,
    prev_w_ptr,
    prev_b_ptr,
    T,
    C,
    K,  # B * T, the reduction length
    k_per_split,  # rows per split, a multiple of BLOCK_K
    s_xb,
    s_xt,
    s_xc,
    s_gb,
    s_gt,
    s_gc,
    noise_std,
    scale,
    seed_w,
    seed_b,
    ACC: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    SPLIT: tl.constexpr,  # write raw partial sums; add_noise.finish does the epilogue
    HAS_PREV_W: tl.constexpr,
    HAS_PREV_B: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows (of the B*T) per step
    BLOCK_C: tl.constexpr,
):
    """scale * (prev + sum_{i,t} c_i xhat_it g_it + noise_std * z) (weight) and the same without xhat (bias)."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    aw = tl.zeros((BLOCK_K, BLOCK_C), dtype=ACC)
    ab = tl.zeros((BLOCK_K, BLOCK_C), dtype=ACC)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        mask_k = rows < k_hi
        g, sample, t, keep = clipped_rows(g_ptr, c_ptr, rows, mask_k, T, s_gb, s_gt, cols, mask_c, s_gc, ACC)
        if HAS_W:  # rows with c_i = 0: xhat not loaded either (0 * inf is NaN), see clipped_rows
            x_rows = sample.to(tl.int64) * s_xb + t.to(tl.int64) * s_xt
            mask = keep[:, None] & mask_c[None, :]
            x = tl.load(x_ptr + x_rows[:, None] + cols[None, :] * s_xc, mask=mask, other=0.0).to(ACC)
            aw += x * g
        if HAS_B:
            ab += g
    if HAS_W:
        sw = tl.sum(aw, axis=0)
        _store_vector(
            w_ptr, sw, cols, mask_c, True, pid_s, C, prev_w_ptr, noise_std, scale, seed_w, HAS_PREV_W, HAS_NOISE, SPLIT
        )
    if HAS_B:
        sb = tl.sum(ab, axis=0)
        _store_vector(
            b_ptr, sb, cols, mask_c, True, pid_s, C, prev_b_ptr, noise_std, scale, seed_b, HAS_PREV_B, HAS_NOISE, SPLIT
        )


@triton.jit
def _sum_bound_kernel(
    x_ptr,
    g_ptr,
    out_ptr,  # (B * n_tiles, 3) float64: value, err, cap
    T,
    C,
    n_tiles,
    s_xb,
    s_xt,
    s_xc,
    s_gb,
    s_gt,
    s_gc,
    C_E,  # gamma_T(2^-53) (1 + 2 gamma_{T+2}(2^-53)): the column sums' error per unit of E
    F_E,  # 1 + 2 gamma_{T+2}(2^-53): E (computed) -> an upper bound on the exact sum_t |v_tc|
    F_OUT,
    HAS_X: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """||sum_t v_t||^2 with v_t = x_t * g_t (HAS_X) or g_t, one program per (sample, C-tile), float64:
    see `sum_bound`."""
    pid = tl.program_id(0)
    sample = pid // n_tiles
    cols = (pid - sample * n_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    offs_t = tl.arange(0, BLOCK_T)
    x_base = x_ptr + sample.to(tl.int64) * s_xb
    g_base = g_ptr + sample.to(tl.int64) * s_gb
    c = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float64)
    e = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float64)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + offs_t
        mask = (rows < T)[:, None] & mask_c[None, :]
        v = load_exact(g_base + rows[:, None] * s_gt + cols[None, :] * s_gc, mask).to(tl.float64)
        if HAS_X:
            v *= load_exact(x_base + rows[:, None] * s_xt + cols[None, :] * s_xc, mask).to(tl.float64)
        c += v
        e += tl.abs(v)
    c = tl.sum(c, axis=0)
    e = tl.sum(e, axis=0)
    d = e * C_E  # |c - exact column sum| <= d
    ub = e * F_E  # >= sum_t |v_tc| >= |exact column sum|
    tl.store(out_ptr + pid * 3, tl.sum(c * c, axis=0) * F_OUT)
    tl.store(out_ptr + pid * 3 + 1, tl.sum(d * (2.0 * tl.abs(c) + d), axis=0) * F_OUT)
    tl.store(out_ptr + pid * 3 + 2, tl.sum(ub * ub, axis=0) * F_OUT)


# ----------------------------------------------------------------------------- configs


def norms_config(T: int, C: int) -> dict:
    """16 rows x 128 channels: two fp32 accumulators of 16 registers a thread each on 4 warps."""
    return dict(BLOCK_T=block(T, 1, 16), BLOCK_C=block(C, 16, 128), num_warps=4, num_stages=2)


def clipped_sum_config(C: int) -> dict:
    """16 rows x 128 channels per step: two fp32 accumulators of 16 registers a thread on 4 warps,
    72 registers a thread in all for fp32 on sm_90 (128 with 32-row steps: a memory-bound kernel
    wants the occupancy); bench/aot_compile.py (bench/results/aot_sm90.md)."""
    return dict(BLOCK_K=16, BLOCK_C=block(C, 16, 128), num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------- host side


def launch_norms(xhat: Tensor, g: Tensor, weight: bool, bias: bool) -> tuple[Tensor, Tensor]:
    """Returns (weight norms or empty, bias norms or empty), (B,) each."""
    (xhat, g), dt = cast_inputs("affine_norms", xhat, g)
    B, T, C = g.shape
    cfg = norms_config(T, C)
    n_tiles = triton.cdiv(C, cfg["BLOCK_C"])
    w, b = output(g, (B, n_tiles), dt, weight), output(g, (B, n_tiles), dt, bias)
    if B * n_tiles > 0 and (weight or bias):
        launch(
            _affine_norms_kernel,
            (B * n_tiles,),
            xhat,
            g,
            w,
            b,
            T,
            C,
            n_tiles,
            *xhat.stride(),
            *g.stride(),
            ACC=acc_tl(dt),
            HAS_W=weight,
            HAS_B=bias,
            **cfg,
        )
    return per_sample(w), per_sample(b)


def launch_clipped_sum(
    xhat: Tensor,
    g: Tensor,
    c: Tensor,
    weight: bool,
    bias: bool,
    noise_std: float,
    scale: float,
    seed_w: int,
    seed_b: int,
    prev_w: Tensor | None,
    prev_b: Tensor | None,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns (weight or empty, bias or empty), (C,) each. ``splits`` forces the row split (tests)."""
    (xhat, g), dt = cast_inputs("affine_clipped_sum", xhat, g)
    B, T, C = g.shape
    w, b = output(g, (C,), dt, weight), output(g, (C,), dt, bias)
    if C == 0 or not (weight or bias):
        return w, b
    cfg = clipped_sum_config(C)
    K = B * T
    tiles = triton.cdiv(C, cfg["BLOCK_C"])
    rs = RowSplit.plan(tiles, K, cfg["BLOCK_K"], g.device, splits)
    ws_w, ws_b = rs.target(w, weight), rs.target(b, bias)
    launch(
        _affine_clipped_sum_kernel,
        (tiles, rs.n),
        xhat,
        g,
        c.contiguous(),
        ws_w,
        ws_b,
        given_or(prev_w, w),
        given_or(prev_b, b),
        max(T, 1),  # no row when T == 0; avoids a division by zero in the row split
        C,
        K,
        rs.k_per,
        *xhat.stride(),
        *g.stride(),
        *epilogue_args(noise_std, scale, seed_w, seed_b),
        ACC=acc_tl(dt),
        HAS_W=weight,
        HAS_B=bias,
        SPLIT=rs.split,
        HAS_PREV_W=prev_w is not None,
        HAS_PREV_B=prev_b is not None,
        HAS_NOISE=noise_std != 0.0,
        **cfg,
    )
    rs.finish(ws_w, prev_w, w, noise_std=noise_std, scale=scale, seed=seed_w)
    rs.finish(ws_b, prev_b, b, noise_std=noise_std, scale=scale, seed=seed_b)
    return w, b


def launch_sum_bound(x: Tensor, g: Tensor, has_x: bool) -> Tensor:
    """(B, 3) float64 (value, err, cap) of ||sum_t v_t||^2, v_t = x_t * g_t (has_x) or g_t; see
    `sum_bound`. x, g: (B, T, C), float32 or 16-bit (x is not read unless has_x)."""
    B, T, C = g.shape
    bc = block(C, 16, 128)
    n_tiles = triton.cdiv(C, bc)
    out = output(g, (B, n_tiles, 3), torch.float64)
    f_e = 1.0 + 2.0 * gamma(T + 2, U64)
    if B * n_tiles > 0:
        launch(
            _sum_bound_kernel,
            (B * n_tiles,),
            x,
            g,
            out,
            T,
            C,
            n_tiles,
            *x.stride(),
            *g.stride(),
            gamma(T, U64) * f_e,
            f_e,
            round_up_factor(n_tiles + bc + 16),
            HAS_X=has_x,
            BLOCK_T=8,
            BLOCK_C=bc,
            num_warps=4,
            num_stages=2,
        )
    return out.sum(1)


# ----------------------------------------------------------------------------- ops


def _norms_fake(xhat, g, weight, bias):
    dt, B = acc_dtype(xhat, g), g.shape[0]
    return output(g, (B,), dt, weight), output(g, (B,), dt, bias)


_affine_norms_op = register_op("affine_norms", _norms_fake)(launch_norms)


def _clipped_sum_fake(xhat, g, c, weight, bias, *epilogue):
    dt, C = acc_dtype(xhat, g), g.shape[2]
    return output(g, (C,), dt, weight), output(g, (C,), dt, bias)


@register_op("affine_clipped_sum", _clipped_sum_fake)
def _affine_clipped_sum_op(
    xhat: Tensor,
    g: Tensor,
    c: Tensor,
    weight: bool,
    bias: bool,
    noise_std: float,
    scale: float,
    seed_w: int,
    seed_b: int,
    prev_w: Tensor | None,
    prev_b: Tensor | None,
) -> tuple[Tensor, Tensor]:
    return launch_clipped_sum(xhat, g, c, weight, bias, noise_std, scale, seed_w, seed_b, prev_w, prev_b)


def affine_norms(xhat: Tensor, g: Tensor, *, weight: bool, bias: bool) -> tuple[Tensor | None, Tensor | None]:
    """Per-sample squared norms ||sum_t xhat_it * g_it||^2 (weight) and ||sum_t g_it||^2 (bias).

    xhat, g: (B, T, C). Returns (B,) tensors in float32 (float64 for float64 inputs), None where not asked.
    """
    w, b = _affine_norms_op(xhat, g, bool(weight), bool(bias))
    return (w if weight else None), (b if bias else None)


def affine_clipped_sum(
    xhat: Tensor,
    g: Tensor,
    c: Tensor,
    *,
    weight: bool,
    bias: bool,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed_w: int = 0,
    seed_b: int = 0,
    prev_w: Tensor | None = None,
    prev_b: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Clipped, summed, noised affine gradients, (C,) each, one fused kernel:

    weight: scale * (prev_w + sum_i c_i sum_t xhat_it * g_it + noise_std * z_w)
    bias:   scale * (prev_b + sum_i c_i sum_t g_it + noise_std * z_b)
    """
    w, b = _affine_clipped_sum_op(
        xhat, g, c, bool(weight), bool(bias), *epilogue_args(noise_std, scale, seed_w, seed_b), prev_w, prev_b
    )
    return (w if weight else None), (b if bias else None)


# ----------------------------------------------------------------------------- certified bounds

_sum_bound_op = register_op("sum_bound", lambda x, g, has_x: output(g, (g.shape[0], 3), torch.float64))(
    launch_sum_bound
)


def tight(*tensors: Tensor) -> bool:
    """Whether the kernels' own bounds serve these inputs: float32 or 16-bit (no float64 operand), no
    empty dimension. Otherwise the reference's bounds serve (float64 arithmetic is the reference's)."""
    return acc_dtype(*tensors) != torch.float64 and all(t.numel() > 0 for t in tensors)


def sum_bound(x: Tensor | None, g: Tensor) -> Bound:
    """Bound of ||sum_t v_t||^2 per sample, v_t = x_t * g_t (x given) or g_t; x, g: (B, T, C) float32 or
    16-bit (`tight`).

    One program per (sample, C-tile) sums v_t and |v_t| over T in float64: the products of two float32
    values are exact there (48 significant bits, no overflow or underflow), so the column sum c and
    the sum of absolute values E (computed) satisfy |c - exact| <= gamma_T(2^-53) sum_t |v_t| <=
    gamma_T E (1 + 2 gamma_{T+2}) =: delta and sum_t |v_t| <= E (1 + 2 gamma_{T+2}) =: e, entrywise. So

        n = sum_c exact_c^2 <= sum_c (|c| + delta)^2 = sum c^2 + sum delta (2 |c| + delta)   (value, err)
        n <= sum_c e_c^2                                                                    (cap)

    each a sum over channels, so the programs' parts add; they are scaled by
    round_up_factor(n_tiles + BLOCK_C + 16) to cover their float64 roundings and the host's sum
    over tiles (all terms non-negative)."""
    out = _sum_bound_op(g if x is None else x, g, x is not None)
    return Bound(out[:, 0], out[:, 1], out[:, 2])


def affine_norms_bound(xhat: Tensor, g: Tensor, *, weight: bool, bias: bool) -> tuple[Bound | None, Bound | None]:
    """Bounds of affine_norms, ||sum_t xhat_t * g_t||^2 and ||sum_t g_t||^2 per sample (`sum_bound`);
    float64 inputs and empty dimensions: the reference's bounds."""
    if not tight(xhat, g):
        return _ref_bounds.affine_norms_bound(xhat, g, weight=weight, bias=bias)
    return (sum_bound(xhat, g) if weight else None), (sum_bound(None, g) if bias else None)
