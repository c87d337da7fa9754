"""Secure-mode noise in a Triton kernel: ChaCha20 quarter rounds on uint32 in registers, the
sum-of-four Box-Muller sampler in float64, and the epilogue out = scale * (prev + noise_std * z) rounded
once to the output dtype. The same stream as the reference (dpkernels/ops/reference/chacha.py, which
states the construction and what it guarantees): element j uses the ChaCha20 block with counter j.

It runs as its own pass after the clipped sum (the engine passes the clipped sum as ``prev``), not
fused into the clipped-sum epilogues: those accumulate in float32 and this sampler needs float64, and
one extra read and write of the gradient costs little next to the 20 ChaCha rounds per element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import given_or, launch, register_op

_BLOCK = 256


@triton.jit
def _rotl(x, n: tl.constexpr):
    return (x << n) | (x >> (32 - n))


@triton.jit
def _quarter(a, b, c, d):
    a = a + b
    d = _rotl(d ^ a, 16)
    c = c + d
    b = _rotl(b ^ c, 12)
    a = a + b
    d = _rotl(d ^ a, 8)
    c = c + d
    b = _rotl(b ^ c, 7)
    return a, b, c, d


@triton.jit
def chacha20_block(ctr, k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2):
    """The 16 uint32 output words of the ChaCha20 block (RFC 8439 2.3) with counter ``ctr`` (a uint32
    tensor) under the key words k0..k7 and nonce words n0..n2 (uint32 scalars)."""
    z = tl.zeros_like(ctr)
    i0 = z + 0x61707865
    i1 = z + 0x3320646E
    i2 = z + 0x79622D32
    i3 = z + 0x6B206574
    i4 = z + k0
    i5 = z + k1
    i6 = z + k2
    i7 = z + k3
    i8 = z + k4
    i9 = z + k5
    i10 = z + k6
    i11 = z + k7
    i13 = z + n0
    i14 = z + n1
    i15 = z + n2
    x0, x1, x2, x3, x4, x5, x6, x7 = i0, i1, i2, i3, i4, i5, i6, i7
    x8, x9, x10, x11, x12, x13, x14, x15 = i8, i9, i10, i11, ctr, i13, i14, i15
    for _ in range(10):
        x0, x4, x8, x12 = _quarter(x0, x4, x8, x12)
        x1, x5, x9, x13 = _quarter(x1, x5, x9, x13)
        x2, x6, x10, x14 = _quarter(x2, x6, x10, x14)
        x3, x7, x11, x15 = _quarter(x3, x7, x11, x15)
        x0, x5, x10, x15 = _quarter(x0, x5, x10, x15)
        x1, x6, x11, x12 = _quarter(x1, x6, x11, x12)
        x2, x7, x8, x13 = _quarter(x2, x7, x8, x13)
        x3, x4, x9, x14 = _quarter(x3, x4, x9, x14)
    return (
        x0 + i0, x1 + i1, x2 + i2, x3 + i3, x4 + i4, x5 + i5, x6 + i6, x7 + i7,
        x8 + i8, x9 + i9, x10 + i10, x11 + i11, x12 + ctr, x13 + i13, x14 + i14, x15 + i15,
    )  # fmt: skip


@triton.jit
def _uniform53(lo, hi):
    """(a + 1) 2^-53, a = (hi << 21) | (lo >> 11): exact in float64 (a + 1 <= 2^53)."""
    a = hi.to(tl.float64) * 2097152.0 + (lo >> 11).to(tl.float64)
    return (a + 1.0) * 1.1102230246251565e-16


@triton.jit
def _box_muller(lo_a, hi_a, lo_b, hi_b):
    r = tl.sqrt(-2.0 * tl.log(_uniform53(lo_a, hi_a)))  # fp64 sqrt is correctly rounded (PTX sqrt.rn.f64)
    t = 6.283185307179586 * _uniform53(lo_b, hi_b)
    return r * tl.cos(t), r * tl.sin(t)


@triton.jit
def _u32(x):
    return x.to(tl.int64).to(tl.uint32)  # a Python int argument arrives as int32 or int64


@triton.jit
def _secure_noise_kernel(
    prev_ptr, out_ptr, N, noise_std, scale,
    k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2,
    HAS_PREV: tl.constexpr, NARROW: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out[j] = scale * (prev[j] + noise_std * z_j) in float64, rounded once to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    w = chacha20_block(
        offs.to(tl.uint32), _u32(k0), _u32(k1), _u32(k2), _u32(k3), _u32(k4), _u32(k5), _u32(k6), _u32(k7),
        _u32(n0), _u32(n1), _u32(n2),
    )  # fmt: skip
    c1, s1 = _box_muller(w[0], w[1], w[2], w[3])
    c2, s2 = _box_muller(w[4], w[5], w[6], w[7])
    z = (((c1 + s1) + c2) + s2) * 0.5
    x = z * noise_std
    if HAS_PREV:
        x = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float64) + x
    x = x * scale
    if NARROW:  # a 16-bit output through float32, as torch converts float64 to it (and the reference)
        x = x.to(tl.float32)
    if BF16:  # round to nearest even on the bits: the CPU interpreter's float32 -> bfloat16 cast truncates
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)  # now exact in bfloat16
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chacha20_blocks_for_tests(ctr_ptr, out_ptr, N, k0, k1, k2, k3, k4, k5, k6, k7, n0, n1, n2, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    ctr = tl.load(ctr_ptr + offs, mask=mask, other=0).to(tl.uint32)
    w = chacha20_block(
        ctr, _u32(k0), _u32(k1), _u32(k2), _u32(k3), _u32(k4), _u32(k5), _u32(k6), _u32(k7),
        _u32(n0), _u32(n1), _u32(n2),
    )  # fmt: skip
    for q in tl.static_range(16):
        tl.store(out_ptr + offs * 16 + q, w[q].to(tl.int64), mask=mask)


def _secure_noise_fake(prev, shape, noise_std, scale, key, nonce, device, dtype):
    return torch.empty(tuple(shape), device=device, dtype=dtype)


@register_op("secure_noise", _secure_noise_fake)
def _secure_noise_op(
    prev: Tensor | None,
    shape: Sequence[int],
    noise_std: float,
    scale: float,
    key: Sequence[int],
    nonce: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    out = torch.empty(tuple(shape), device=device, dtype=dtype)
    return launch_secure_noise(prev, out, noise_std=noise_std, scale=scale, key=key, nonce=nonce)


def launch_secure_noise(
    prev: Tensor | None, out: Tensor, *, noise_std: float, scale: float, key: Sequence[int], nonce: Sequence[int]
) -> Tensor:
    """Write scale * (prev + noise_std * z) into ``out`` (contiguous): the launcher, checked inputs."""
    n = out.numel()
    if n == 0:
        return out
    dtype = out.dtype
    launch(
        _secure_noise_kernel,
        (triton.cdiv(n, _BLOCK),),
        given_or(prev, out),  # out stands for an absent prev: never read (HAS_PREV False)
        out,
        n,
        float(noise_std),
        float(scale),
        *(int(w) for w in key),
        *(int(w) for w in nonce),
        num_warps=4,
        num_stages=1,
        HAS_PREV=prev is not None,
        NARROW=dtype in (torch.float16, torch.bfloat16),
        BF16=dtype == torch.bfloat16,
        BLOCK=_BLOCK,
    )
    return out


def secure_noise(
    prev: Tensor | None,
    shape,
    *,
    noise_std: float,
    scale: float,
    key: Sequence[int],
    nonce: Sequence[int],
    device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """See dpkernels.ops.reference.secure_noise: the same stream, computed in the kernel."""
    from ..reference.chacha import MAX_ELEMENTS, check_words

    key, nonce = check_words("secure_noise", key, nonce)
    shape = [int(s) for s in shape]
    if math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(f"secure_noise: {math.prod(shape)} elements exceed the 2**32 a stream numbers")
    return _secure_noise_op(prev, shape, float(noise_std), float(scale), key, nonce, torch.device(device), dtype)


def chacha20_blocks(counter: Tensor, key: Sequence[int], nonce: Sequence[int]) -> Tensor:
    """The raw blocks, for the tests: (N, 16) int64 holding uint32 words, as the reference's."""
    from ..reference.chacha import MASK, check_words

    key, nonce = check_words("chacha20_blocks", key, nonce)
    ctr = (counter & MASK).contiguous()
    out = torch.empty((ctr.numel(), 16), device=ctr.device, dtype=torch.int64)
    if ctr.numel():
        launch(
            _chacha20_blocks_for_tests,
            (triton.cdiv(ctr.numel(), _BLOCK),),
            ctr,
            out,
            ctr.numel(),
            *key,
            *nonce,
            BLOCK=_BLOCK,
        )
    return out
