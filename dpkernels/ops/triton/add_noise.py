"""The epilogue every clipped sum shares, its split-K finish, and `add_noise` (the epilogue alone).

    out = scale * (prev + sum_s part_s + noise_std * z),   z_j = randn(seed, j)

z comes from Triton's in-kernel Philox (tl.randn: Philox4x32-10 keyed by the 64-bit seed,
counter = (low, high 32 bits of the element's flat offset j in the row-major output, 0, 0),
Box-Muller on two of the four output words). It is a function of (seed, shape) only, so a tensor gets the same noise
whichever kernel writes it (the fused epilogue of a clipped sum, its split-K finish, or
`add_noise`); it is NOT the reference's torch.Generator stream, so tests compare it by
its statistics, not elementwise.

A clipped sum reduces K = B*T rows into each output tile. When its tiles cannot fill the GPU the rows
are split over programs (`RowSplit`): each writes its raw partial sum to a workspace, and the finish
kernel sums the parts in a fixed order before the same epilogue, so results are deterministic either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import acc_tl, epilogue_args, given_or, launch, num_sms, output, register_op

WIDE_OFFSETS = 1 << 31  # outputs this large need int64 offsets (int32 ones would wrap and repeat the noise)

# ----------------------------------------------------------------------------- device functions


@triton.jit
def _epilogue(
    x,
    offs,
    mask,
    prev_ptr,
    noise_std,
    scale,
    seed,
    HAS_PREV: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    WIDE: tl.constexpr,  # int64 offsets, for outputs of >= 2**31 elements (same stream below 2**32)
):
    """scale * (x + prev[offs] + noise_std * randn(seed, offs)), in x's (accumulation) dtype."""
    if HAS_PREV:
        x += tl.load(prev_ptr + offs, mask=mask, other=0.0).to(x.dtype)
    if HAS_NOISE:
        z = tl.randn(seed, offs.to(tl.int64)) if WIDE else tl.randn(seed, offs.to(tl.int32))
        x += z.to(x.dtype) * noise_std
    return x * scale


@triton.jit
def _tile_offsets(rows, cols, n_cols, WIDE: tl.constexpr):
    """Flat offsets of the tile (rows x cols) of a row-major (*, n_cols) output; int64 when WIDE."""
    if WIDE:
        rows = rows.to(tl.int64)
    return rows[:, None] * n_cols + cols[None, :]


@triton.jit
def _store_vector(
    out_ptr,
    x,
    offs,
    mask,
    owner,  # whether this program writes the vector (one column of programs of a matmul does)
    split,
    n,
    prev_ptr,
    noise_std,
    scale,
    seed,
    HAS_PREV: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """A program's slice x of an (n,) output: its raw part to row ``split`` of the (S, n) workspace, or
    through the epilogue to the output."""
    if SPLIT:
        tl.store(out_ptr + split * n + offs, x, mask=mask & owner)
    elif owner:
        x = _epilogue(x, offs, mask, prev_ptr, noise_std, scale, seed, HAS_PREV, HAS_NOISE, False)
        tl.store(out_ptr + offs, x, mask=mask)


@triton.jit
def _store_tile(
    out_ptr,
    acc,
    row0,  # output row of the tile's local row q = 0 (a conv group's first channel; 0 for a Linear)
    q0,  # the tile's first local row: it holds local rows q0 + r, those < n_q existing
    n_q,
    n_rows,  # rows of the output (the workspace holds S of them)
    cols,
    mask_c,
    n_cols,
    split,
    prev_ptr,
    noise_std,
    scale,
    seed,
    HAS_PREV: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    SPLIT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EPI_ROWS: tl.constexpr,  # rows of the tile per slice of the noise epilogue
):
    """A program's (BLOCK_R, cols) accumulator of an (n_rows, n_cols) output: its raw part to the
    ``split``-th workspace, or through the epilogue to the output."""
    q = q0 + tl.arange(0, BLOCK_R)
    offs = _tile_offsets(row0 + q, cols, n_cols, WIDE)
    mask = (q < n_q)[:, None] & mask_c[None, :]
    if SPLIT:
        tl.store(out_ptr + split.to(tl.int64) * n_rows * n_cols + offs, acc, mask=mask)
    elif HAS_NOISE:
        # Philox over a whole 128x128 accumulator at once needs more registers than a thread
        # has (ptxas for sm_90: 255 registers and ~900 B of spills). So the raw tile goes out
        # and the epilogue runs over it in EPI_ROWS-row slices, re-read from L1/L2 where this
        # program just wrote it (bar.sync makes the writes visible across its threads).
        tl.store(out_ptr + offs, acc, mask=mask)
        tl.debug_barrier()
        for r0 in range(0, BLOCK_R, EPI_ROWS):  # new names: a loop variable may not change shape
            qs = q0 + r0 + tl.arange(0, EPI_ROWS)
            so = _tile_offsets(row0 + qs, cols, n_cols, WIDE)
            sm = (qs < n_q)[:, None] & mask_c[None, :]
            x = tl.load(out_ptr + so, mask=sm, other=0.0)
            x = _epilogue(x, so, sm, prev_ptr, noise_std, scale, seed, HAS_PREV, True, WIDE)
            tl.store(out_ptr + so, x, mask=sm)
    else:
        acc = _epilogue(acc, offs, mask, prev_ptr, noise_std, scale, seed, HAS_PREV, False, WIDE)
        tl.store(out_ptr + offs, acc, mask=mask)


# ----------------------------------------------------------------------------- finish


@triton.jit
def _finish_kernel(
    part_ptr,
    prev_ptr,
    out_ptr,
    N,
    n_parts,
    noise_std,
    scale,
    seed,
    ACC: tl.constexpr,  # float32, or float64 for float64 outputs
    BLOCK: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    WIDE: tl.constexpr,
):
    """out[j] = scale * (prev[j] + sum_s part[s, j] + noise_std * z_j) over a flat output of N elements.
    The parts are summed in a fixed order: the result does not depend on scheduling."""
    if WIDE:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.zeros((BLOCK,), dtype=ACC)
    for s in range(n_parts):
        x += tl.load(part_ptr + s * N + offs, mask=mask, other=0.0).to(ACC)
    x = _epilogue(x, offs, mask, prev_ptr, noise_std, scale, seed, HAS_PREV, HAS_NOISE, WIDE)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


_FINISH_BLOCK = 1024


def finish(
    parts: Tensor | None, prev: Tensor | None, out: Tensor, *, noise_std: float, scale: float, seed: int
) -> Tensor:
    """Write scale * (prev + parts.sum(0) + noise_std * z) into ``out`` (contiguous); parts: (S, *out.shape)."""
    n = out.numel()
    if n == 0:
        return out
    # int64 offsets: 4 elements a thread, not 8 (sm_90, 16-bit outputs: 8 B of spills at 8 a thread)
    wide = n >= WIDE_OFFSETS
    launch(
        _finish_kernel,
        (triton.cdiv(n, _FINISH_BLOCK),),
        given_or(parts, out),  # out stands for absent parts and prev: never read (n_parts 0, HAS_PREV False)
        given_or(prev, out),
        out,
        n,
        0 if parts is None else parts.shape[0],
        *epilogue_args(noise_std, scale, seed),
        num_warps=8 if wide else 4,
        num_stages=1,
        ACC=acc_tl(out.dtype),
        BLOCK=_FINISH_BLOCK,
        HAS_PREV=prev is not None,
        HAS_NOISE=noise_std != 0.0,
        WIDE=wide,
    )
    return out


@dataclass(frozen=True)
class RowSplit:
    """A clipped sum's reduction over K rows split over ``n`` programs of ``k_per`` rows each."""

    n: int
    k_per: int  # a multiple of the kernel's row block

    @staticmethod
    def plan(tiles: int, K: int, block_k: int, device: torch.device, splits: int | None = None) -> RowSplit:
        """Split only when the ``tiles`` output tiles cannot fill the GPU (two waves of programs), and
        never below 8 row blocks per split, where the workspace pass and the finish kernel would cost
        more than the parallelism gains. ``splits`` forces the factor (tests cover both paths with it)."""
        k_tiles = triton.cdiv(max(K, 1), block_k)
        if splits is None:
            want = triton.cdiv(2 * num_sms(device), max(1, tiles))
            s = max(1, min(want, triton.cdiv(K, block_k) // 8, 64))
        else:
            s = max(1, min(splits, k_tiles))
        k_per = triton.cdiv(k_tiles, s) * block_k
        return RowSplit(triton.cdiv(max(K, 1), k_per), k_per)

    @property
    def split(self) -> bool:
        return self.n > 1

    def target(self, out: Tensor, wanted: bool = True) -> Tensor:
        """What the kernel writes for ``out``: ``out`` itself, or when split an (n, *out.shape) workspace."""
        return output(out, (self.n, *out.shape), out.dtype) if self.split and wanted else out

    def finish(self, target: Tensor, prev: Tensor | None, out: Tensor, *, noise_std: float, scale: float, seed: int):
        """The epilogue over a workspace the kernel wrote (it wrote ``out`` itself otherwise)."""
        if target is not out:
            finish(target, prev, out, noise_std=noise_std, scale=scale, seed=seed)


# ----------------------------------------------------------------------------- add_noise


def _add_noise_fake(prev, shape, noise_std, scale, seed, device, dtype):
    return torch.empty(tuple(shape), device=device, dtype=dtype)


@register_op("add_noise", _add_noise_fake)
def _add_noise_op(
    prev: Tensor | None,
    shape: Sequence[int],
    noise_std: float,
    scale: float,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    out = torch.empty(tuple(shape), device=device, dtype=dtype)
    return finish(None, prev, out, noise_std=noise_std, scale=scale, seed=seed)


def add_noise(
    prev: Tensor | None, shape, *, noise_std: float, scale: float, seed: int, device, dtype: torch.dtype = torch.float32
) -> Tensor:
    """scale * (prev + noise_std * z): the update of a parameter no sample touched this step.

    Computed in float32 (float64 for a float64 ``dtype``) and rounded once to ``dtype``.
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device)
    return _add_noise_op(prev, list(shape), *epilogue_args(noise_std, scale, seed), device, dtype)
