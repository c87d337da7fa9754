"""Embedding per-sample norms, the clipped sum with dense noise, and the tied-head cross term.

Sample i looks up ids x_i (T,) in a table W (V, D) and receives output gradients g_i (T, D):

    dW_i[v] = sum_{t: x_it = v} g_it                         (tokens equal to padding_idx excluded)
    norms:  ||dW_i||^2 = sum_v ||sum_{t: x_it = v} g_it||^2 = sum_{t,s} [x_it = x_is] (g_it . g_is)
    sum:    W' = scale * (prev + sum_i c_i dW_i + noise_std * z)     (V, D), z dense over the table
    cross:  <dE_i, dH_i> = sum_{t,s} g_h[i, s, x_t] (a_s . g_e,t)    (table tied to a Linear head)

Norms, two kernels, chosen by T (``norms_method``):
- "gram" (T <= 64, one 64 x 64 tile): the equality-masked Gram sum_{t,s} [x_t = x_s] (g_t . g_s) in
  registers, G G^T by tl.dot over D-chunks. Needs no sort (one launch) and reads g once; its T^2 D
  multiply-adds are at most 64x the T D of reading g, on tensor cores or FMA units that idle anyway.
- "scan" (longer sequences, where the Gram's cost grows as T^2): each sample's ids sorted on the
  host (torch.sort, stable: a fixed summation order), then one program per (sample, D-tile) walks the
  sorted tokens in tiles of 32, forms each run's sum S_v by a segmented prefix sum carried across
  tiles and adds ||S_v||^2 at the run's last token: the reference's own formula, cost linear in T,
  never a (B, V, D) tensor. Within a tile the segmented sum is a masked lower-triangular matmul
  (32 multiply-adds per element of g, on tensor cores for 16-bit g). A first version used
  tl.associative_scan with a segmented combine: no fewer registers on sm_90, and Triton's CPU
  interpreter runs custom scans element by element (34 s for one T = 70 test case, vs ~1 s now).

Clipped sum: all B*T tokens sorted by id once (padding tokens moved past the table), so each block of
BLOCK_V consecutive table rows owns one contiguous range of sorted tokens (its bounds from one
searchsorted). One program per (row block, D-tile) gathers its tokens' rows c_i g_it and adds them
into its rows by a one-hot matmul (onehot[r, k] = [x_k = v0 + r]), then applies the shared noise
epilogue (add_noise.py) and writes its tile once: every table row, touched or not, is written
exactly once with its noise, no atomics, no zero-fill or second pass. The padding row gets noise
and no data, as the reference documents. A non-finite gradient row would spread to the other rows of its
block through the matmul (0 * inf is NaN): the rows of a sample with c_i = 0 are never loaded
(`_common.clipped_rows`), and the engine refuses or drops (c_i = 0) a sample whose norm is not finite
before any sum is taken.

Cross term: one program per (sample, Th-tile, Te-tile) forms A_S G_E,T^T by tl.dot, gathers
P[s, t] = g_h[i, s, x_t] and sums the product; the head's (Th, V) gradient is only gathered.

Accumulation in float32 (float64 for float64 inputs). Norm and cross programs write partials that
the host sums in a fixed order, and the stable sorts fix the order of every sum: results are
deterministic. The dispatcher has checked the inputs (ops._validate), ids in [0, V) included.
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
    clipped_rows,
    common_input,
    dot_operand,
    dot_precision,
    epilogue_args,
    given_or,
    gram_tile_config,
    k_block,
    launch,
    load_exact,
    num_sms,
    output,
    per_sample,
    register_op,
    tile_ranges,
)
from .add_noise import WIDE_OFFSETS, _epilogue, _tile_offsets
from .affine import tight

GRAM_MAX_T = 64  # norms_method: the Gram kernel while one sample fits one (64 x 64) tile

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _embedding_gram_kernel(
    ids_ptr,
    g_ptr,
    out_ptr,  # (B * n_parts,) partial norms
    T,
    D,
    n_parts,  # D-ranges per sample, one program each
    d_per_part,  # columns per program, a multiple of BLOCK_K
    pad,
    s_ib,
    s_it,
    s_gb,
    s_gt,
    s_gd,
    ACC: tl.constexpr,  # float32, float64 for float64 g
    DOT: tl.constexpr,  # tl.dot operand dtype, see _common.dot_operand
    HAS_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,  # >= T: the whole sample is one tile
    BLOCK_K: tl.constexpr,  # chunk of the D reduction
):
    """sum_{t,s} [x_t = x_s != pad] sum_{d in this program's range} g_td g_sd."""
    pid = tl.program_id(0)
    sample = pid // n_parts
    part = pid - sample * n_parts
    rows = tl.arange(0, BLOCK_T)
    mask_t = rows < T
    x = tl.load(ids_ptr + sample.to(tl.int64) * s_ib + rows * s_it, mask=mask_t, other=-1)
    keep = mask_t
    if HAS_PAD:
        keep = keep & (x != pad)
    g_base = g_ptr + sample.to(tl.int64) * s_gb
    offs_k = tl.arange(0, BLOCK_K)
    gg = tl.zeros((BLOCK_T, BLOCK_T), dtype=ACC)
    d_lo = part * d_per_part
    d_hi = tl.minimum(d_lo + d_per_part, D)
    for k0 in range(d_lo, d_hi, BLOCK_K):
        cols = k0 + offs_k
        m = keep[:, None] & (cols < d_hi)[None, :]  # padding rows are never read: a NaN there stays out
        gt = tl.load(g_base + rows[:, None] * s_gt + cols[None, :] * s_gd, mask=m, other=0.0)
        gt = gt.to(DOT)
        # ieee even for float32: the reference sums rows exactly in fp32 (no matmul, so no TF32 to match)
        gg = tl.dot(gt, tl.trans(gt), gg, input_precision="ieee")
    same = (x[:, None] == x[None, :]) & keep[:, None] & keep[None, :]
    tl.store(out_ptr + pid, tl.sum(tl.where(same, gg, 0.0)))


@triton.jit
def _embedding_scan_kernel(
    sid_ptr,  # (B, T) ids sorted within each sample (torch.sort keeps the input's strides)
    perm_ptr,  # (B, T) the position t of each sorted id
    g_ptr,
    out_ptr,  # (B * n_dtiles,) partial norms
    T,
    D,
    n_dtiles,
    pad,
    s_sb,
    s_st,
    s_pb,
    s_pt,
    s_gb,
    s_gt,
    s_gd,
    ACC: tl.constexpr,
    DOT: tl.constexpr,  # tl.dot operand dtype, see _common.dot_operand
    HAS_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,  # sorted tokens per step
    BLOCK_D: tl.constexpr,
):
    """sum over runs v of the sorted ids of ||sum_{t in run v} g_t[D-tile]||^2, one pass over the sample.

    Within a tile of sorted tokens the segmented prefix sum is a matmul, Q = L G with
    L[t, s] = [s <= t and x_s = x_t] (runs are contiguous once sorted); the run still open at the
    tile's end is carried into the next tile. Q at a run's last token is the run's sum S_v.
    """
    pid = tl.program_id(0)
    sample = pid // n_dtiles
    cols = (pid - sample * n_dtiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    ids_base = sid_ptr + sample.to(tl.int64) * s_sb
    perm_base = perm_ptr + sample.to(tl.int64) * s_pb
    g_base = g_ptr + sample.to(tl.int64) * s_gb
    offs_t = tl.arange(0, BLOCK_T)
    lower = offs_t[None, :] <= offs_t[:, None]
    last = offs_t == BLOCK_T - 1
    carry = tl.zeros((BLOCK_D,), dtype=ACC)  # the partial sum of the run still open at the tile's end
    carry_id = tl.full((), -1, tl.int64)  # and its id (-1: none; ids are >= 0)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + offs_t
        mask_t = rows < T
        x = tl.load(ids_base + rows * s_st, mask=mask_t, other=-1).to(tl.int64)
        x_next = tl.load(ids_base + (rows + 1) * s_st, mask=rows + 1 < T, other=-1).to(tl.int64)
        end = (x != x_next) & mask_t
        keep = mask_t
        if HAS_PAD:
            keep = keep & (x != pad)  # the padding run sums zeros; its rows are never read
        pos = tl.load(perm_base + rows * s_pt, mask=mask_t, other=0)
        g = tl.load(
            g_base + pos.to(tl.int64)[:, None] * s_gt + cols[None, :] * s_gd,
            mask=keep[:, None] & mask_d[None, :],
            other=0.0,
        )
        run = ((x[:, None] == x[None, :]) & lower).to(DOT)
        # ieee: 1.0 * g is exact, so Q holds exactly-rounded fp32 sums as the reference's index_add
        q = tl.dot(run, g.to(DOT), tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC), input_precision="ieee")
        q = tl.where((x == carry_id)[:, None], q + carry[None, :], q)
        acc += tl.where(end[:, None], q * q, 0.0)  # ||S_v||^2 at the run's last token
        carry = tl.sum(tl.where(last[:, None], q, 0.0), axis=0)
        carry_id = tl.max(tl.where(last, x, -1))
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def _embedding_clipped_sum_kernel(
    sid_ptr,  # (B*T,) ids sorted over the whole batch, padding moved to V (past every block)
    perm_ptr,  # (B*T,) flat position i*T + t of each sorted id
    bounds_ptr,  # (n_vblocks + 1,) sorted-token range of each block of BLOCK_V rows
    g_ptr,
    c_ptr,
    out_ptr,  # (V, D)
    prev_ptr,
    V,
    D,
    T,
    s_gb,
    s_gt,
    s_gd,
    noise_std,
    scale,
    seed,
    ACC: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    WIDE: tl.constexpr,  # V * D >= 2**31: int64 offsets (see add_noise.py)
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,  # sorted tokens per step
):
    """out[v, :] = scale * (prev[v] + sum_{(i,t): x_it = v} c_i g_it + noise_std * z[v]) for one tile."""
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    lo = tl.load(bounds_ptr + pid_v)
    hi = tl.load(bounds_ptr + pid_v + 1)
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=ACC)
    for k0 in range(lo, hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < hi
        x = tl.load(sid_ptr + ks, mask=mask_k, other=-1)
        pos = tl.load(perm_ptr + ks, mask=mask_k, other=0)
        gc, _, _, _ = clipped_rows(g_ptr, c_ptr, pos, mask_k, T, s_gb, s_gt, cols, mask_d, s_gd, ACC)
        onehot = (rows[:, None] == x[None, :]).to(ACC)  # (BLOCK_V, BLOCK_K): scatter as a matmul
        # ieee: 1.0 * gc is exact, so the sum rounds like the reference's fp32 index_add (TF32 would not)
        acc = tl.dot(onehot, gc, acc, input_precision="ieee")
    offs = _tile_offsets(rows, cols, D, WIDE)
    mask = (rows < V)[:, None] & mask_d[None, :]
    acc = _epilogue(acc, offs, mask, prev_ptr, noise_std, scale, seed, HAS_PREV, HAS_NOISE, WIDE)
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _embedding_cross_kernel(
    ids_ptr,
    ge_ptr,
    a_ptr,
    gh_ptr,
    out_ptr,  # (B * n_tiles,) partials
    Te,
    Th,
    D,
    n_tiles_t,
    n_tiles,  # Th-tiles x Te-tiles per sample
    pad,
    s_ib,
    s_it,
    s_eb,
    s_et,
    s_ed,
    s_ab,
    s_as,
    s_ad,
    s_hb,
    s_hs,
    s_hv,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,  # as the reference's (P^T a) matmul, see _common.dot_precision
    DOT: tl.constexpr,
    HAS_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,  # head positions per tile
    BLOCK_T: tl.constexpr,  # embedding positions per tile
    BLOCK_K: tl.constexpr,  # chunk of the D reduction
):
    """sum_{s in S-tile, t in T-tile} g_h[i, s, x_t] (a_s . g_e,t), padding tokens t excluded."""
    pid = tl.program_id(0)
    sample = pid // n_tiles
    rows_s, mask_s, rows_t, mask_t, _ = tile_ranges(pid - sample * n_tiles, n_tiles_t, Th, Te, BLOCK_S, BLOCK_T)
    x = tl.load(ids_ptr + sample.to(tl.int64) * s_ib + rows_t * s_it, mask=mask_t, other=0)
    keep = mask_t
    if HAS_PAD:
        keep = keep & (x != pad)
    a_base = a_ptr + sample.to(tl.int64) * s_ab
    e_base = ge_ptr + sample.to(tl.int64) * s_eb
    offs_k = tl.arange(0, BLOCK_K)
    m = tl.zeros((BLOCK_S, BLOCK_T), dtype=ACC)  # tile of A_i G_e,i^T
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < D
        a = tl.load(
            a_base + rows_s[:, None] * s_as + cols[None, :] * s_ad, mask=mask_s[:, None] & mask_k[None, :], other=0.0
        )
        e = tl.load(
            e_base + cols[:, None] * s_ed + rows_t[None, :] * s_et, mask=mask_k[:, None] & keep[None, :], other=0.0
        )
        m = tl.dot(a.to(DOT), e.to(DOT), m, input_precision=PRECISION)
    p = tl.load(
        gh_ptr + sample.to(tl.int64) * s_hb + rows_s[:, None] * s_hs + x.to(tl.int64)[None, :] * s_hv,
        mask=mask_s[:, None] & keep[None, :],
        other=0.0,
    ).to(ACC)
    tl.store(out_ptr + pid, tl.sum(m * p))


# ----------------------------------------------------------------------------- configs
# Register counts: ptxas for sm_90, from bench/aot_compile.py (bench/results/aot_sm90.md).


def norms_method(T: int) -> str:
    """The norms kernel for T positions: "gram" while a sample fits one Gram tile (T <= 64): one launch,
    no sort, T^2 D work at most 64x the unavoidable read of g; "scan" beyond, where the sort costs
    less than the T^2 term."""
    return "gram" if T <= GRAM_MAX_T else "scan"


def gram_config(T: int, D: int, dtype: torch.dtype) -> dict:
    """A (<=64 x <=64) Gram accumulator (32 fp32 registers a thread on 4 warps) and D-chunks of 64
    16-bit columns (wgmma) or 16 wider ones: fp32 dots here are ieee, on FMA units with operands in
    registers (sm_90 fp32: 123 registers a thread, 168 with 32 columns)."""
    return dict(
        BLOCK_T=block(T, 16, GRAM_MAX_T),
        BLOCK_K=block(D, 16, 64 if dtype.itemsize == 2 else 16),
        num_warps=4,
        num_stages=2,
    )


def scan_config(T: int, D: int) -> dict:
    """32 sorted tokens x 64 columns per step: the gathered tile, its run sums and the accumulator,
    16 fp32 registers a thread each on 4 warps; 96 registers in all for fp32 on sm_90, 80 for bf16."""
    return dict(BLOCK_T=block(T, 16, 32), BLOCK_D=block(D, 16, 64), num_warps=4, num_stages=2)


def clipped_sum_config(V: int, D: int) -> dict:
    """32 table rows x 64 columns per program, 32 tokens per step. The one-hot matmul is an fp32 FMA
    dot (ieee, see the kernel), whose operands live in registers: 128 registers a thread on sm_90
    with the noise epilogue on the whole tile, no spills; 128 columns took 255."""
    return dict(BLOCK_V=block(V, 16, 32), BLOCK_D=block(D, 16, 64), BLOCK_K=32, num_warps=4, num_stages=2)


def cross_config(Te: int, Th: int, D: int, dtype: torch.dtype) -> dict:
    """64 x 64 tiles of A G_e^T, the Linear ghost kernel's Gram tiles (Th rows by Te columns), and the
    gathered P tile beside them: 95 registers a thread and wgmma for bf16 on sm_90; ieee fp32 on FMA
    units within _common.fma_warps's budget."""
    return dict(BLOCK_S=block(Th, 16, 64), **gram_tile_config(Te, D, k_block(dtype), dtype))


# ----------------------------------------------------------------------------- host side


def _pad_arg(padding_idx: int | None, num_embeddings: int) -> int:
    """torch's convention (negative counts from the end), or -1 (never an id) for none."""
    if padding_idx is None:
        return -1
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def launch_norms(
    ids: Tensor, g: Tensor, num_embeddings: int, padding_idx: int | None, method: str | None = None
) -> Tensor:
    """The host side of embedding_norms; ``method`` forces "gram" or "scan" (tests cover both)."""
    common_input("embedding_norms", g)
    dt = acc_dtype(g)
    B, T = ids.shape
    D = g.shape[2]
    method = norms_method(T) if method is None else method
    if B * T * D == 0:
        return torch.zeros(B, device=g.device, dtype=dt)
    if method == "gram":
        if T > GRAM_MAX_T:
            raise ValueError(f"embedding_norms: the gram kernel holds T <= {GRAM_MAX_T} positions, got T = {T}")
        kernel, cfg = _embedding_gram_kernel, gram_config(T, D, g.dtype)
        bk = cfg["BLOCK_K"]
        k_tiles = triton.cdiv(D, bk)
        # split D over programs until the batch fills two waves of the GPU
        want = max(1, min(k_tiles, triton.cdiv(2 * num_sms(g.device), B)))
        d_per = triton.cdiv(k_tiles, want) * bk
        n = triton.cdiv(D, d_per)
        ids_args: tuple[Tensor, ...] = (ids,)
        tiles: tuple[int, ...] = (n, d_per)
        ids_strides: tuple[int, ...] = ids.stride()
    elif method == "scan":
        kernel, cfg = _embedding_scan_kernel, scan_config(T, D)
        n = triton.cdiv(D, cfg["BLOCK_D"])
        # stable: a fixed summation order. The sorted ids and positions have the strides of ids (a transposed
        # (T, B) batch gives (1, B)), so the kernel takes their strides rather than assume contiguity.
        sid, perm = torch.sort(ids, dim=1, stable=True)
        ids_args = (sid, perm)
        tiles, ids_strides = (n,), (*sid.stride(), *perm.stride())
    else:
        raise ValueError(f"embedding_norms: method must be 'gram' or 'scan', got {method!r}")
    out = output(g, (B, n), dt)
    launch(
        kernel,
        (B * n,),
        *ids_args,
        g,
        out,
        T,
        D,
        *tiles,
        _pad_arg(padding_idx, num_embeddings),
        *ids_strides,
        *g.stride(),
        ACC=acc_tl(dt),
        DOT=dot_operand(kernel, g.dtype),
        HAS_PAD=padding_idx is not None,
        **cfg,
    )
    return per_sample(out)


def launch_clipped_sum(
    ids: Tensor,
    g: Tensor,
    c: Tensor,
    num_embeddings: int,
    padding_idx: int | None,
    noise_std: float,
    scale: float,
    seed: int,
    prev: Tensor | None,
) -> Tensor:
    common_input("embedding_clipped_sum", g)
    B, T = ids.shape
    V, D = num_embeddings, g.shape[2]
    out = output(g, (V, D), acc_dtype(g))
    if V * D == 0:
        return out
    cfg = clipped_sum_config(V, D)
    bv, bd = cfg["BLOCK_V"], cfg["BLOCK_D"]
    n_vblocks = triton.cdiv(V, bv)
    keys = ids.reshape(-1)
    if padding_idx is not None:  # padding tokens sort past the table: no block's range holds them
        keys = torch.where(keys == _pad_arg(padding_idx, V), V, keys)
    sid, perm = torch.sort(keys, stable=True)  # stable: a fixed summation order within a row
    edges = (torch.arange(n_vblocks + 1, device=g.device, dtype=sid.dtype) * bv).clamp_(max=V)
    bounds = torch.searchsorted(sid, edges)  # bounds[j] = number of tokens with id < j * BLOCK_V
    launch(
        _embedding_clipped_sum_kernel,
        (n_vblocks, triton.cdiv(D, bd)),
        sid,
        perm,
        bounds,
        g,
        c.contiguous(),
        out,
        given_or(prev, out),
        V,
        D,
        max(T, 1),  # no token when T == 0; avoids a division by zero in the position split
        *g.stride(),
        *epilogue_args(noise_std, scale, seed),
        ACC=acc_tl(out.dtype),
        HAS_PREV=prev is not None,
        HAS_NOISE=noise_std != 0.0,
        WIDE=V * D >= WIDE_OFFSETS,
        **cfg,
    )
    return out


def launch_cross(ids: Tensor, g_e: Tensor, a: Tensor, g_h: Tensor, padding_idx: int | None) -> Tensor:
    in_dt = common_input("embedding_linear_cross", a, g_e)
    common_input("embedding_linear_cross", g_h)
    dt = acc_dtype(g_e, a, g_h)
    a, g_e = a.to(in_dt), g_e.to(in_dt)
    B, Te = ids.shape
    Th, D, V = a.shape[1], a.shape[2], g_h.shape[2]
    if B * Te * Th == 0:
        return torch.zeros(B, device=g_e.device, dtype=dt)
    cfg = cross_config(Te, Th, D, in_dt)
    n_t = triton.cdiv(Te, cfg["BLOCK_T"])
    n_tiles = triton.cdiv(Th, cfg["BLOCK_S"]) * n_t
    out = output(g_e, (B, n_tiles), dt)
    launch(
        _embedding_cross_kernel,
        (B * n_tiles,),
        ids,
        g_e,
        a,
        g_h,
        out,
        Te,
        Th,
        D,
        n_t,
        n_tiles,
        _pad_arg(padding_idx, V),
        *ids.stride(),
        *g_e.stride(),
        *a.stride(),
        *g_h.stride(),
        ACC=acc_tl(dt),
        PRECISION=dot_precision(in_dt),
        DOT=dot_operand(_embedding_cross_kernel, in_dt),
        HAS_PAD=padding_idx is not None,
        **cfg,
    )
    return per_sample(out)


# ----------------------------------------------------------------------------- ops


@register_op("embedding_norms", lambda ids, g, num_embeddings, padding_idx: output(g, (ids.shape[0],), acc_dtype(g)))
def _embedding_norms_op(ids: Tensor, g: Tensor, num_embeddings: int, padding_idx: int | None) -> Tensor:
    return launch_norms(ids, g, num_embeddings, padding_idx)


def _clipped_sum_fake(ids, g, c, num_embeddings, *rest):
    return output(g, (num_embeddings, g.shape[2]), acc_dtype(g))


_embedding_clipped_sum_op = register_op("embedding_clipped_sum", _clipped_sum_fake)(launch_clipped_sum)


def _cross_fake(ids, g_e, a, g_h, padding_idx):
    return output(g_e, (ids.shape[0],), acc_dtype(g_e, a, g_h))


_embedding_linear_cross_op = register_op("embedding_linear_cross", _cross_fake)(launch_cross)


def embedding_norms(ids: Tensor, g: Tensor, *, num_embeddings: int, padding_idx: int | None) -> Tensor:
    """Per-sample squared norms of an Embedding's weight gradient, exact for repeated tokens:

        ||dW_i||^2 = sum_v ||sum_{t: x_it = v} g_it||^2 = sum_{t,s} [x_it = x_is] (g_it . g_is)

    tokens equal to ``padding_idx`` excluded. ids: (B, T) integer, g: (B, T, D).
    Returns (B,) in float32 (float64 for float64 g).
    """
    return _embedding_norms_op(ids, g, int(num_embeddings), padding_idx)


def embedding_clipped_sum(
    ids: Tensor,
    g: Tensor,
    c: Tensor,
    *,
    num_embeddings: int,
    padding_idx: int | None,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed: int = 0,
    prev: Tensor | None = None,
) -> Tensor:
    """scale * (prev + sum_i c_i dW_i + noise_std * z), a (V, D) table written once.

    The noise z is dense over the whole table (rows no sample touched included); the padding_idx row
    gets noise and no data, as in the reference (see its docstring for why).
    ids: (B, T), g: (B, T, D), c: (B,). Returns (V, D) in float32 (float64 for float64 g).
    """
    return _embedding_clipped_sum_op(
        ids, g, c, int(num_embeddings), padding_idx, *epilogue_args(noise_std, scale, seed), prev
    )


def embedding_linear_cross(ids: Tensor, g_e: Tensor, a: Tensor, g_h: Tensor, *, padding_idx: int | None) -> Tensor:
    """Per-sample cross term <dE_i, dH_i> of a table (V, D) used as an Embedding and as a Linear head:

        <dE_i, dH_i> = sum_{t,s} g_h[i, s, x_t] * (a_s . g_e,t)       (padding tokens t excluded)

    ids (B, Te), g_e (B, Te, D), a (B, Th, D), g_h (B, Th, V). Returns (B,) in float32 (float64).
    """
    return _embedding_linear_cross_op(ids, g_e, a, g_h, padding_idx)


# ----------------------------------------------------------------------------- certified bounds


@triton.jit
def _embedding_bound_kernel(
    sid_ptr,  # (B, T) ids sorted within each sample (torch.sort keeps the input's strides)
    perm_ptr,  # (B, T) the position t of each sorted id
    g_ptr,
    out_ptr,  # (B * n_dtiles, 3) float64: value, err, cap
    T,
    D,
    n_dtiles,
    pad,
    s_sb,
    s_st,
    s_pb,
    s_pt,
    s_gb,
    s_gt,
    s_gd,
    C_E,  # gamma_m(2^-53) (1 + 2 gamma_{m+2}(2^-53)): a run sum's error per unit of E, see embedding_norms_bound
    F_E,  # 1 + 2 gamma_{m+2}(2^-53): E (computed) -> an upper bound on the exact sum_t |g_td|
    F_OUT,
    HAS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """sum over the distinct ids v of ||sum_{t: x_t = v} g_t[D-tile]||^2 with its error and cap, float64:
    see `embedding_norms_bound`. One pass over the sample's sorted tokens: each run's sum c and sum of
    |g| E are accumulated token by token in float64 and folded into the totals at the run's last token.
    (tl.dot on float64 operands, which would form a tile's run sums at once, does not compile for sm_90.)"""
    pid = tl.program_id(0)
    sample = pid // n_dtiles
    cols = (pid - sample * n_dtiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    ids_base = sid_ptr + sample.to(tl.int64) * s_sb
    perm_base = perm_ptr + sample.to(tl.int64) * s_pb
    g_base = g_ptr + sample.to(tl.int64) * s_gb
    c = tl.zeros((BLOCK_D,), dtype=tl.float64)  # the open run's sum
    e = tl.zeros((BLOCK_D,), dtype=tl.float64)  # and its sum of |g|
    acc_v = tl.zeros((BLOCK_D,), dtype=tl.float64)
    acc_e = tl.zeros((BLOCK_D,), dtype=tl.float64)
    acc_c = tl.zeros((BLOCK_D,), dtype=tl.float64)
    x_next = tl.load(ids_base).to(tl.int64)
    for k in range(0, T):
        x = x_next
        x_next = tl.load(ids_base + (k + 1) * s_st, mask=k + 1 < T, other=-1).to(tl.int64)
        pos = tl.load(perm_base + k * s_pt).to(tl.int64)
        m = mask_d
        if HAS_PAD:
            m = m & (x != pad)  # the padding id sums zeros; its rows are never read
        v = load_exact(g_base + pos * s_gt + cols * s_gd, m).to(tl.float64)
        c += v
        e += tl.abs(v)
        end = x != x_next  # the run's last token (ids >= 0; -1 past the end)
        d = e * C_E  # >= |c - exact run sum|
        ub = e * F_E  # >= sum |g| over the run >= |exact run sum|
        acc_v += tl.where(end, c * c, 0.0)
        acc_e += tl.where(end, d * (2.0 * tl.abs(c) + d), 0.0)
        acc_c += tl.where(end, ub * ub, 0.0)
        c = tl.where(end, 0.0, c)
        e = tl.where(end, 0.0, e)
    tl.store(out_ptr + pid * 3, tl.sum(acc_v, axis=0) * F_OUT)
    tl.store(out_ptr + pid * 3 + 1, tl.sum(acc_e, axis=0) * F_OUT)
    tl.store(out_ptr + pid * 3 + 2, tl.sum(acc_c, axis=0) * F_OUT)


def bound_config(D: int) -> dict:
    """128 columns a program, one float64 element of each of the five running vectors a thread on 4 warps;
    3 stages, so that the next tokens' id, position and row loads are in flight during a token's adds."""
    return dict(BLOCK_D=block(D, 16, 128), num_warps=4, num_stages=3)


def launch_norms_bound(ids: Tensor, g: Tensor, num_embeddings: int, padding_idx: int | None) -> Tensor:
    """(B, 3) float64 (value, err, cap) of the embedding norm; see `embedding_norms_bound`. float32 and
    16-bit g (float64 is bounded by the reference)."""
    B, T = ids.shape
    D = g.shape[2]
    cfg = bound_config(D)
    bd = cfg["BLOCK_D"]
    n = triton.cdiv(D, bd)
    out = output(g, (B, n, 3), torch.float64)
    if B * n == 0 or T == 0:
        return out.zero_().sum(1)
    # stable: a fixed summation order. sid and perm keep the strides of ids (a transposed batch: (1, B))
    sid, perm = torch.sort(ids, dim=1, stable=True)
    m = T + 2  # roundings a token's term goes through in its run's sum (at most T - 1), with margin
    f_e = round_up_factor(m)
    launch(
        _embedding_bound_kernel,
        (B * n,),
        sid,
        perm,
        g,
        out,
        T,
        D,
        n,
        _pad_arg(padding_idx, num_embeddings),
        *sid.stride(),
        *perm.stride(),
        *g.stride(),
        gamma(m, U64) * f_e,
        f_e,
        round_up_factor(T + bd + n + 32),
        HAS_PAD=padding_idx is not None,
        **cfg,
    )
    return out.sum(1)


def _bound_fake(ids, g, num_embeddings, padding_idx):
    return output(g, (ids.shape[0], 3), torch.float64)


_embedding_norms_bound_op = register_op("embedding_norms_bound", _bound_fake)(launch_norms_bound)


def embedding_norms_bound(ids: Tensor, g: Tensor, *, num_embeddings: int, padding_idx: int | None) -> Bound:
    """Bound (dpkernels/ops/bounds.py) of the per-sample squared norm of embedding_norms,

        n = sum_v ||c*_v||^2,   c*_v = sum_{t: x_t = v} g_t     (tokens equal to padding_idx excluded),

    for the stored g (B, T, D), float32 or 16-bit (`affine.tight`; float64 g and empty dimensions: the
    reference's bound). Read exactly (`load_exact`: bf16 subnormals included) and summed in float64 per
    (sample, id, column) as `affine.sum_bound` sums a column: no overflow or underflow is possible (sums
    of float32 values are multiples of 2^-149 below 2^128 T, their squares within float64's range).
    Each id's run of sorted tokens is summed in order, so a token's term reaches its run sum c_v
    through at most m = T + 2 float64 roundings (m - 2 would do), and with E_v the computed sum of |g|
    over the same run (rounded the same way, E_v >= (1 - u)^m sum |g|), entrywise

        |c_v - c*_v| <= gamma_m sum_t |g_t| <= gamma_m E_v (1 + 2 gamma_{m+2}) =: delta_v
        |c*_v| <= sum_t |g_t| <= E_v (1 + 2 gamma_{m+2}) =: e_v

    (u = 2^-53; (1 - u)^-m <= 1 + gamma_m, and the factor's margin covers the product's rounding). So

        n <= sum_v sum_d (|c_vd| + delta_vd)^2 = sum c^2 + sum delta (2 |c| + delta)   (value, err)
        n <= sum_v sum_d e_vd^2                                                     (cap)

    All terms are non-negative, so each program's sums over its (id, column) pairs and the host's sum
    over the D-tiles are covered by F_OUT = round_up_factor(T + BLOCK_D + n_dtiles + 32) (the
    accumulation over at most T runs, the sum over the tile's columns, the host's sum, the few
    roundings of each term).
    The cap, the triangle inequality per id and column, is at most the generic (sum_t |g_t|)^2, and n
    itself (to rounding) where every id occurs once. A non-finite g entry (not padding) makes E
    and so err and cap non-finite."""
    if not tight(g) or ids.numel() == 0:
        return _ref_bounds.embedding_norms_bound(ids, g, num_embeddings=num_embeddings, padding_idx=padding_idx)
    out = _embedding_norms_bound_op(ids, g, int(num_embeddings), padding_idx)
    return Bound(out[:, 0], out[:, 1], out[:, 2])
