"""The noise epilogue every clipped sum shares, and `add_noise` (the epilogue alone).

    out = scale * (prev + sum_s part_s + noise_std * z),   z_j = randn(seed, j)

z comes from Triton's in-kernel Philox (tl.randn: Philox4x32-10 keyed by the 64-bit seed,
counter = (low, high 32 bits of the element's flat offset j in the row-major output, 0, 0),
Box-Muller on two of the four output words). It is a function of (seed, shape) only, so a tensor gets the same noise
whichever kernel writes it (the fused epilogue of a clipped sum, its split-K finish, or
`add_noise`); it is NOT the reference's torch.Generator stream, so tests compare it by
its statistics, not elementwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import NS, SEED_MASK, check_prev, launch

WIDE_OFFSETS = 1 << 31  # outputs this large need int64 offsets (int32 ones would wrap and repeat the noise)


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
    acc = tl.float64 if out.dtype == torch.float64 else tl.float32
    dummy = out  # stands for an absent pointer; never read (HAS_PREV False, n_parts 0)
    launch(
        _finish_kernel,
        (triton.cdiv(n, _FINISH_BLOCK),),
        parts if parts is not None else dummy,
        prev.contiguous() if prev is not None else dummy,
        out,
        n,
        0 if parts is None else parts.shape[0],
        float(noise_std),
        float(scale),
        int(seed) & SEED_MASK,
        num_warps=4,
        num_stages=1,
        ACC=acc,
        BLOCK=_FINISH_BLOCK,
        HAS_PREV=prev is not None,
        HAS_NOISE=noise_std != 0.0,
        WIDE=n >= WIDE_OFFSETS,
    )
    return out


@torch.library.custom_op(f"{NS}::triton_add_noise", mutates_args=())
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


@_add_noise_op.register_fake
def _(prev, shape, noise_std, scale, seed, device, dtype):
    return torch.empty(tuple(shape), device=device, dtype=dtype)


def add_noise(
    prev: Tensor | None,
    shape,
    *,
    noise_std: float,
    scale: float,
    seed: int,
    device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """scale * (prev + noise_std * z): the update of a parameter no sample touched this step.

    Computed in float32 (float64 for a float64 ``dtype``) and rounded once to ``dtype``.
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"add_noise: dtype must be a floating type, got {dtype}")
    check_prev("add_noise", "prev", prev, shape, device)
    return _add_noise_op(prev, list(shape), float(noise_std), float(scale), int(seed) & SEED_MASK, device, dtype)
