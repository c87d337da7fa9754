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

Each program writes one partial sum; the host sums a sample's partials in a fixed order,
so results are deterministic (no atomics). Accumulation in float32, float64 for float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import NS, acc_dtype, block, check_rows, common_input, dot_operand, dot_precision, launch

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
    k = pid - sample * n_pairs
    # (i, j), i <= j: the k-th cell of the row-major upper triangle; row i starts at
    # S(i) = i (2 n - i + 1) / 2, so i = floor(((2n+1) - sqrt((2n+1)^2 - 8k)) / 2),
    # computed in float64 and corrected by one step either way against rounding.
    n2 = 2 * n_tiles + 1
    i = ((n2 - tl.sqrt((n2 * n2 - 8 * k).to(tl.float64))) * 0.5).to(tl.int32)
    i = tl.where(i * (n2 - i) // 2 > k, i - 1, i)
    i = tl.where((i + 1) * (n2 - i - 1) // 2 <= k, i + 1, i)
    j = i + k - i * (n2 - i) // 2

    rows_i = i * BLOCK_T + tl.arange(0, BLOCK_T)
    rows_j = j * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_i = rows_i < T
    mask_j = rows_j < T
    offs_k = tl.arange(0, BLOCK_K)

    a_base = a_ptr + sample.to(tl.int64) * s_ab
    aa = tl.zeros((BLOCK_T, BLOCK_T), dtype=ACC)  # tile (I, J) of A_i A_i^T
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < D
        x = tl.load(
            a_base + rows_i[:, None] * s_at + cols[None, :] * s_ad, mask=mask_i[:, None] & mask_k[None, :], other=0.0
        )
        y = tl.load(
            a_base + cols[:, None] * s_ad + rows_j[None, :] * s_at, mask=mask_k[:, None] & mask_j[None, :], other=0.0
        )
        aa = tl.dot(x.to(DOT), y.to(DOT), aa, input_precision=PRECISION)

    g_base = g_ptr + sample.to(tl.int64) * s_gb
    gg = tl.zeros((BLOCK_T, BLOCK_T), dtype=ACC)  # tile (I, J) of G_i G_i^T
    for k0 in range(0, P, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < P
        x = tl.load(
            g_base + rows_i[:, None] * s_gt + cols[None, :] * s_gp, mask=mask_i[:, None] & mask_k[None, :], other=0.0
        )
        y = tl.load(
            g_base + cols[:, None] * s_gp + rows_j[None, :] * s_gt, mask=mask_k[:, None] & mask_j[None, :], other=0.0
        )
        gg = tl.dot(x.to(DOT), y.to(DOT), gg, input_precision=PRECISION)

    weight = tl.where(i == j, 1.0, 2.0)  # an off-diagonal tile stands for itself and its transpose
    tl.store(w_ptr + pid, tl.sum(aa * gg) * weight)
    if HAS_BIAS:
        tl.store(b_ptr + pid, tl.sum(gg) * weight)


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
    tile = pid - sample * n_tiles
    tile_p = tile // n_tiles_d
    tile_d = tile - tile_p * n_tiles_d
    offs_p = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < P
    mask_d = offs_d < D
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
        acc = tl.dot(tl.trans(g).to(DOT), a.to(DOT), acc, input_precision=PRECISION)
        if HAS_BIAS and tile_d == 0:
            bacc += tl.sum(g.to(ACC), axis=0)
    tl.store(w_ptr + pid, tl.sum(acc * acc))
    if HAS_BIAS:
        tl.store(b_ptr + pid, tl.sum(bacc * bacc))  # zero unless tile_d == 0


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
    """||sum_t g_t||^2, one program per (sample, p-tile)."""
    pid = tl.program_id(0)
    sample = pid // n_tiles
    offs_p = (pid - sample * n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_t = tl.arange(0, BLOCK_T)
    g_base = g_ptr + sample.to(tl.int64) * s_gb
    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=ACC)  # reduced over rows once, after the loop
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + offs_t
        mask = (rows < T)[:, None] & mask_p[None, :]
        acc += tl.load(g_base + rows[:, None] * s_gt + offs_p[None, :] * s_gp, mask=mask, other=0.0).to(ACC)
    s = tl.sum(acc, axis=0)
    tl.store(out_ptr + pid, tl.sum(s * s))


# ----------------------------------------------------------------------------- configs


def _k_block(dtype: torch.dtype) -> int:
    """The reduction chunk: 64 for 16-bit, 32 for 4-byte, 16 for 8-byte inputs, so that three
    staged operand tiles fit shared memory and float64 Gram tiles fit registers (AOT report)."""
    return {2: 64, 4: 32}.get(dtype.itemsize, 16)


def ghost_config(T: int, d: int, p: int, dtype: torch.dtype) -> dict:
    """64x64 Gram tiles: two float32 accumulators of 64x64 on 4 warps take 64 registers a thread
    together, leaving room for the staged operands."""
    return dict(
        BLOCK_T=block(T, 16, 64),
        BLOCK_K=block(max(d, p), 16, _k_block(dtype)),
        num_warps=4,
        num_stages=3,
    )


def inst_config(T: int, d: int, p: int, dtype: torch.dtype) -> dict:
    """128x128 output tiles on 8 warps, as for a plain matmul of the same shape."""
    bp, bd = block(p, 16, 128), block(d, 16, 128)
    return dict(
        BLOCK_P=bp,
        BLOCK_D=bd,
        BLOCK_T=block(T, 16, _k_block(dtype)),
        num_warps=8 if bp * bd >= 128 * 128 else 4,
        num_stages=3,
    )


def bias_config(T: int, p: int) -> dict:
    return dict(BLOCK_P=block(p, 16, 256), BLOCK_T=block(T, 1, 16), num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------- host side


def _cast(op: str, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    in_dt = common_input(op, a, g)
    return a.to(in_dt), g.to(in_dt), acc_dtype(a, g)


def launch_ghost(a: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    a, g, dt = _cast("linear_norms", a, g)
    B, T, d = a.shape
    p = g.shape[2]
    cfg = ghost_config(T, d, p, a.dtype)
    n_tiles = triton.cdiv(T, cfg["BLOCK_T"])
    if n_tiles >= 23170:  # the kernel's pair index arithmetic is int32
        raise ValueError(f"linear_norms: T = {T} is too long for the ghost kernel; use method='inst'")
    n_pairs = n_tiles * (n_tiles + 1) // 2
    w = torch.zeros((B, n_pairs), device=a.device, dtype=dt)
    b = torch.zeros((B, n_pairs) if bias else (0,), device=a.device, dtype=dt)
    if B * n_pairs > 0:
        launch(
            _ghost_kernel,
            (B * n_pairs,),
            a,
            g,
            w,
            b,
            T,
            d,
            p,
            n_tiles,
            n_pairs,
            *a.stride(),
            *g.stride(),
            ACC=tl.float64 if dt == torch.float64 else tl.float32,
            PRECISION=dot_precision(a.dtype),
            DOT=dot_operand(_ghost_kernel, a.dtype),
            HAS_BIAS=bias,
            **cfg,
        )
    return w.sum(1), (b.sum(1) if bias else b)


def launch_inst(a: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    a, g, dt = _cast("linear_norms", a, g)
    B, T, d = a.shape
    p = g.shape[2]
    cfg = inst_config(T, d, p, a.dtype)
    n_tiles_d = max(1, triton.cdiv(d, cfg["BLOCK_D"]))  # d == 0: one column for the bias
    n_tiles = triton.cdiv(p, cfg["BLOCK_P"]) * n_tiles_d
    w = torch.zeros((B, n_tiles), device=a.device, dtype=dt)
    b = torch.zeros((B, n_tiles) if bias else (0,), device=a.device, dtype=dt)
    if B * n_tiles > 0:
        launch(
            _inst_kernel,
            (B * n_tiles,),
            a,
            g,
            w,
            b,
            T,
            d,
            p,
            n_tiles_d,
            n_tiles,
            *a.stride(),
            *g.stride(),
            ACC=tl.float64 if dt == torch.float64 else tl.float32,
            PRECISION=dot_precision(a.dtype),
            DOT=dot_operand(_inst_kernel, a.dtype),
            HAS_BIAS=bias,
            **cfg,
        )
    return w.sum(1), (b.sum(1) if bias else b)


def launch_bias_norms(g: Tensor) -> Tensor:
    common_input("bias_norms", g)
    dt = acc_dtype(g)
    B, T, p = g.shape
    cfg = bias_config(T, p)
    n_tiles = triton.cdiv(p, cfg["BLOCK_P"])
    out = torch.zeros((B, n_tiles), device=g.device, dtype=dt)
    if B * n_tiles > 0:
        launch(
            _bias_norms_kernel,
            (B * n_tiles,),
            g,
            out,
            T,
            p,
            n_tiles,
            *g.stride(),
            ACC=tl.float64 if dt == torch.float64 else tl.float32,
            **cfg,
        )
    return out.sum(1)


# ----------------------------------------------------------------------------- ops


@torch.library.custom_op(f"{NS}::triton_linear_norms_ghost", mutates_args=())
def _linear_norms_ghost_op(a: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    return launch_ghost(a, g, bias)


@torch.library.custom_op(f"{NS}::triton_linear_norms_inst", mutates_args=())
def _linear_norms_inst_op(a: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    return launch_inst(a, g, bias)


def _norms_fake(a, g, bias):
    dt = acc_dtype(a, g)
    B = a.shape[0]
    return a.new_empty((B,), dtype=dt), a.new_empty((B,) if bias else (0,), dtype=dt)


_linear_norms_ghost_op.register_fake(_norms_fake)
_linear_norms_inst_op.register_fake(_norms_fake)


@torch.library.custom_op(f"{NS}::triton_bias_norms", mutates_args=())
def _bias_norms_op(g: Tensor) -> Tensor:
    return launch_bias_norms(g)


@_bias_norms_op.register_fake
def _(g):
    return g.new_empty((g.shape[0],), dtype=acc_dtype(g))


def linear_norms(a: Tensor, g: Tensor, *, bias: bool, method: str) -> tuple[Tensor, Tensor | None]:
    """Per-sample squared norms of a Linear layer's weight and bias gradients.

    weight: ||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>          (method "ghost")
                              = sum_{p,d} (sum_t g_tp a_td)^2     (method "inst")
    bias:   ||sum_t g_t||^2
    a: (B, T, d), g: (B, T, p). Returns float32 (float64 for float64 inputs) tensors of shape (B,).
    """
    if method not in ("ghost", "inst"):
        raise ValueError(f"linear_norms: method must be 'ghost' or 'inst', got {method!r}")
    check_rows("linear_norms", a, g)
    op = _linear_norms_ghost_op if method == "ghost" else _linear_norms_inst_op
    w, b = op(a, g, bias)
    return w, (b if bias else None)


def bias_norms(g: Tensor) -> Tensor:
    """Per-sample squared norms of a bias gradient: ||sum_t g_t||^2, g: (B, T, p)."""
    check_rows("bias_norms", None, g)
    return _bias_norms_op(g)
