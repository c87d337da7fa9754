"""Affine parameters of LayerNorm, RMSNorm and GroupNorm: per-sample norms and the clipped sum.

y = xhat * w + b with xhat the normalised input, rows laid out as (B, T, C) (C the affine channels,
T every other non-batch position). Sample i's gradients are (C,) vectors, formed directly:

    gw_i = sum_t xhat_it * g_it,        gb_i = sum_t g_it
    norms:  ||gw_i||^2, ||gb_i||^2
    sum:    W = scale * (prev_w + sum_i c_i gw_i + noise_std * z_w),   b likewise with z_b

Norms: one program per (sample, C-tile) sums xhat * g and g over T in registers and writes the
tile's squared norms; the host sums a sample's C-tiles in a fixed order. The per-sample gradients
never reach memory.

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

from ._common import NS, SEED_MASK, acc_dtype, block, check_prev, common_input, launch
from .add_noise import _epilogue, finish
from .linear_clipped_sum import plan_splits

# ----------------------------------------------------------------------------- kernels


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
    mask_c = cols < C
    offs_t = tl.arange(0, BLOCK_T)
    x_base = x_ptr + sample.to(tl.int64) * s_xb
    g_base = g_ptr + sample.to(tl.int64) * s_gb
    aw = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)  # reduced over rows once, after the loop
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
    if HAS_W:
        sw = tl.sum(aw, axis=0)
        tl.store(w_ptr + pid, tl.sum(sw * sw))
    if HAS_B:
        sb = tl.sum(ab, axis=0)
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
        sample = rows // T
        t = rows - sample * T
        c = tl.load(c_ptr + sample, mask=mask_k, other=0.0).to(ACC)
        mask = mask_k[:, None] & mask_c[None, :]
        g_rows = sample.to(tl.int64) * s_gb + t.to(tl.int64) * s_gt
        g = tl.load(g_ptr + g_rows[:, None] + cols[None, :] * s_gc, mask=mask, other=0.0).to(ACC) * c[:, None]
        if HAS_W:
            x_rows = sample.to(tl.int64) * s_xb + t.to(tl.int64) * s_xt
            x = tl.load(x_ptr + x_rows[:, None] + cols[None, :] * s_xc, mask=mask, other=0.0).to(ACC)
            aw += x * g
        if HAS_B:
            ab += g
    if HAS_W:
        sw = tl.sum(aw, axis=0)
        if SPLIT:
            tl.store(w_ptr + pid_s * C + cols, sw, mask=mask_c)
        else:
            sw = _epilogue(sw, cols, mask_c, prev_w_ptr, noise_std, scale, seed_w, HAS_PREV_W, HAS_NOISE, False)
            tl.store(w_ptr + cols, sw, mask=mask_c)
    if HAS_B:
        sb = tl.sum(ab, axis=0)
        if SPLIT:
            tl.store(b_ptr + pid_s * C + cols, sb, mask=mask_c)
        else:
            sb = _epilogue(sb, cols, mask_c, prev_b_ptr, noise_std, scale, seed_b, HAS_PREV_B, HAS_NOISE, False)
            tl.store(b_ptr + cols, sb, mask=mask_c)


# ----------------------------------------------------------------------------- configs


def norms_config(T: int, C: int) -> dict:
    """16 rows x 128 channels: two fp32 accumulators of 16 registers a thread each on 4 warps."""
    return dict(BLOCK_T=block(T, 1, 16), BLOCK_C=block(C, 16, 128), num_warps=4, num_stages=2)


def clipped_sum_config(C: int) -> dict:
    """16 rows x 128 channels per step: two fp32 accumulators of 16 registers a thread on 4 warps,
    72 registers a thread in all for fp32 on sm_90 (128 with 32-row steps: a memory-bound kernel
    wants the occupancy); tests/ops/test_triton_affine.py::test_aot_sm90."""
    return dict(BLOCK_K=16, BLOCK_C=block(C, 16, 128), num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------- host side


def _cast(op: str, xhat: Tensor, g: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    in_dt = common_input(op, xhat, g)
    return xhat.to(in_dt), g.to(in_dt), acc_dtype(xhat, g)


def _acc_tl(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


def launch_norms(xhat: Tensor, g: Tensor, weight: bool, bias: bool) -> tuple[Tensor, Tensor]:
    """Returns (weight norms or empty, bias norms or empty), (B,) each."""
    xhat, g, dt = _cast("affine_norms", xhat, g)
    B, T, C = g.shape
    cfg = norms_config(T, C)
    n_tiles = triton.cdiv(C, cfg["BLOCK_C"])
    w = torch.zeros((B, n_tiles) if weight else (0,), device=g.device, dtype=dt)
    b = torch.zeros((B, n_tiles) if bias else (0,), device=g.device, dtype=dt)
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
            ACC=_acc_tl(dt),
            HAS_W=weight,
            HAS_B=bias,
            **cfg,
        )
    return (w.sum(1) if weight else w), (b.sum(1) if bias else b)


def launch_clipped_sum(
    xhat: Tensor,
    g: Tensor,
    c: Tensor,
    *,
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
    xhat, g, dt = _cast("affine_clipped_sum", xhat, g)
    B, T, C = g.shape
    w = torch.empty((C,) if weight else (0,), device=g.device, dtype=dt)
    b = torch.empty((C,) if bias else (0,), device=g.device, dtype=dt)
    if C == 0 or not (weight or bias):
        return w, b
    cfg = clipped_sum_config(C)
    bk, bc = cfg["BLOCK_K"], cfg["BLOCK_C"]
    K = B * T
    tiles = triton.cdiv(C, bc)
    s = plan_splits(tiles, K, bk, g.device) if splits is None else max(1, min(splits, triton.cdiv(max(K, 1), bk)))
    k_per = triton.cdiv(triton.cdiv(max(K, 1), bk), s) * bk
    s = triton.cdiv(max(K, 1), k_per)
    split = s > 1
    ws_w = torch.empty((s, C) if split and weight else (0,), device=g.device, dtype=dt)
    ws_b = torch.empty((s, C) if split and bias else (0,), device=g.device, dtype=dt)
    launch(
        _affine_clipped_sum_kernel,
        (tiles, s),
        xhat,
        g,
        c.contiguous(),
        ws_w if split else w,
        ws_b if split else b,
        prev_w.contiguous() if prev_w is not None else w,  # w stands for an absent prev; never read
        prev_b.contiguous() if prev_b is not None else b,
        max(T, 1),  # no row when T == 0; avoids a division by zero in the row split
        C,
        K,
        k_per,
        *xhat.stride(),
        *g.stride(),
        float(noise_std),
        float(scale),
        int(seed_w) & SEED_MASK,
        int(seed_b) & SEED_MASK,
        ACC=_acc_tl(dt),
        HAS_W=weight,
        HAS_B=bias,
        SPLIT=split,
        HAS_PREV_W=prev_w is not None,
        HAS_PREV_B=prev_b is not None,
        HAS_NOISE=noise_std != 0.0,
        **cfg,
    )
    if split:
        if weight:
            finish(ws_w, prev_w, w, noise_std=noise_std, scale=scale, seed=seed_w)
        if bias:
            finish(ws_b, prev_b, b, noise_std=noise_std, scale=scale, seed=seed_b)
    return w, b


# ----------------------------------------------------------------------------- ops


@torch.library.custom_op(f"{NS}::triton_affine_norms", mutates_args=())
def _affine_norms_op(xhat: Tensor, g: Tensor, weight: bool, bias: bool) -> tuple[Tensor, Tensor]:
    return launch_norms(xhat, g, weight, bias)


@_affine_norms_op.register_fake
def _(xhat, g, weight, bias):
    dt = acc_dtype(xhat, g)
    B = g.shape[0]
    return g.new_empty((B,) if weight else (0,), dtype=dt), g.new_empty((B,) if bias else (0,), dtype=dt)


@torch.library.custom_op(f"{NS}::triton_affine_clipped_sum", mutates_args=())
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
    return launch_clipped_sum(
        xhat,
        g,
        c,
        weight=weight,
        bias=bias,
        noise_std=noise_std,
        scale=scale,
        seed_w=seed_w,
        seed_b=seed_b,
        prev_w=prev_w,
        prev_b=prev_b,
    )


@_affine_clipped_sum_op.register_fake
def _(xhat, g, c, weight, bias, noise_std, scale, seed_w, seed_b, prev_w, prev_b):
    dt = acc_dtype(xhat, g)
    C = g.shape[2]
    return g.new_empty((C,) if weight else (0,), dtype=dt), g.new_empty((C,) if bias else (0,), dtype=dt)


def _check(op: str, xhat: Tensor, g: Tensor, c: Tensor | None = None) -> None:
    """xhat and g: (B, T, C) of one shape, c: (B,), one device; errors say which argument is wrong."""
    if g.dim() != 3:
        raise ValueError(f"{op}: g must be (B, T, C), got shape {tuple(g.shape)}; reshape the rows first")
    if xhat.shape != g.shape:
        raise ValueError(f"{op}: xhat must have g's shape {tuple(g.shape)}, got {tuple(xhat.shape)}")
    if xhat.device != g.device:
        raise ValueError(f"{op}: xhat is on {xhat.device} but g on {g.device}; move both to one device")
    if c is not None:
        if c.shape != (g.shape[0],):
            raise ValueError(
                f"{op}: c must hold one clip factor per sample, shape ({g.shape[0]},), got {tuple(c.shape)}"
            )
        if c.device != g.device:
            raise ValueError(f"{op}: c is on {c.device} but g on {g.device}; move both to one device")


def affine_norms(xhat: Tensor, g: Tensor, *, weight: bool, bias: bool) -> tuple[Tensor | None, Tensor | None]:
    """Per-sample squared norms ||sum_t xhat_it * g_it||^2 (weight) and ||sum_t g_it||^2 (bias).

    xhat, g: (B, T, C). Returns (B,) tensors in float32 (float64 for float64 inputs), None where not asked.
    """
    _check("affine_norms", xhat, g)
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
    _check("affine_clipped_sum", xhat, g, c)
    C = g.shape[2]
    check_prev("affine_clipped_sum", "prev_w", prev_w, (C,), g.device)
    check_prev("affine_clipped_sum", "prev_b", prev_b, (C,), g.device)
    w, b = _affine_clipped_sum_op(
        xhat,
        g,
        c,
        bool(weight),
        bool(bias),
        float(noise_std),
        float(scale),
        int(seed_w) & SEED_MASK,
        int(seed_b) & SEED_MASK,
        prev_w,
        prev_b,
    )
    return (w if weight else None), (b if bias else None)
