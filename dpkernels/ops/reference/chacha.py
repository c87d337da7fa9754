"""Secure-mode noise: ChaCha20 (RFC 8439) in counter mode and a Gaussian sampler built for floating point.

Stream. A parameter's noise in a step is keyed by a 256-bit key drawn from the operating system
(dpkernels.secure) and a 96-bit nonce (step, parameter index, rank); element j of the flat output
uses the ChaCha20 block with block counter j (RFC 8439 section 2.3: state = constants, key, counter,
nonce; 20 rounds; the input added back). Any element is computed alone (parallel, regenerable), and
every backend computes the same 32-bit words: the reference here on int64 tensors holding uint32
values, Triton in its kernel (ops/triton/secure_noise.py), csrc in a __host__ __device__ function
(csrc/kernels.h). Block j's first eight words give four 53-bit uniforms

    u_k = (a_k + 1) * 2^-53 in (0, 1],   a_k = (w_{2k+1} << 21) | (w_{2k} >> 11)   (exact in float64)

and the sample is, in float64,

    z = (r_1 cos t_1 + r_1 sin t_1 + r_2 cos t_2 + r_2 sin t_2) / 2,   r = sqrt(-2 ln u_a),  t = 2 pi u_b

(two Box-Muller pairs: four independent N(0, 1), summed, over sqrt(4)), then
out = scale * (prev + noise_std * z) in float64, rounded once to the output dtype.

Why this sampler. Mironov (CCS 2012) showed that the low-order bits of a floating-point Laplace sample
added to a value reveal the value, since the set of reachable outputs depends on it; Jin, McMurtry,
Rubinstein and Ohrimenko (S&P 2022) and Holohan & Braghin ("Secure random sampling in differential
privacy", ESORICS 2021) showed the same for Box-Muller, polar and ziggurat Gaussian samplers in float64.
Holohan & Braghin's mitigation, which Opacus's secure mode uses (four torch.normal draws summed and
halved), is the sum of several independent samples: each output is then reachable through very many
combinations and the gaps in the set of representable outputs that the attacks exploit are filled. Here
that mitigation is applied to 53-bit uniforms (not 32-bit ones) from a cryptographic generator, and the
sample is formed in float64 and rounded once to the parameter's dtype (float32 for float32 training):
the float32 result is round(x + N) for a float64 N whose spacing (<= 2^-52 |N|) is 2^29 times finer
than the float32 grid, so every float32 value near x + N is reachable from every x and its probability
is the Gaussian mass of its rounding cell up to that resolution; the rounding itself is post-processing.

What is and is not guaranteed. Guaranteed (tested): the stream is ChaCha20 (RFC 8439 vectors and the
`cryptography` library agree on every backend); it is unpredictable without the key, which comes from
the OS and is never saved; the noise has the right scale (KS tests as for the default mode). Not
guaranteed: an exact sampler. The four Box-Muller draws are truncated at |z_k| <= sqrt(106 ln 2) = 8.57
(u >= 2^-53), the sum at 17.1 standard deviations (an event of probability below 1e-60), and the
Gaussian mass of each output value is right only up to floating-point rounding; this closes the known
attacks on the set of reachable outputs, it is not a proof of (epsilon, delta) in floating point (an
exact discrete Gaussian, Canonne, Kamath & Steinke 2020, would be). float64 parameters keep the float64
result directly, where only the sum-of-four mitigation applies. Timing: the work per element is fixed
(no rejection loop), so it does not depend on the value or the noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

MASK = 0xFFFFFFFF
CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
MAX_ELEMENTS = 1 << 32  # the 32-bit block counter numbers the elements of one (step, parameter) stream
TWO_PI = 6.283185307179586  # float64(2 pi), the same constant in every backend
_CHUNK = 1 << 16  # elements per pass: the 16 int32 state words (4 MB) stay in cache


def check_words(op: str, key: Sequence[int], nonce: Sequence[int]) -> tuple[list[int], list[int]]:
    """The key (8 words) and nonce (3 words) as lists of ints in [0, 2^32), else a ValueError naming them."""
    for name, words, n in (("key", key, 8), ("nonce", nonce, 3)):
        if len(words) != n or not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w <= MASK for w in words):
            raise ValueError(f"{op}: {name} must be {n} ints in [0, 2**32) (little-endian 32-bit words)")
    return [int(w) for w in key], [int(w) for w in nonce]


def _i32(w: int) -> int:
    """A uint32 word as the int32 with the same bits."""
    return w - (1 << 32) if w >= 1 << 31 else w


def _rotl(x: Tensor, n: int) -> Tensor:
    """Rotate the 32 bits of int32 ``x`` left by n, in place (the right shift is arithmetic: masked)."""
    low = (x >> (32 - n)).bitwise_and_((1 << n) - 1)
    return x.bitwise_left_shift_(n).bitwise_or_(low)


def _quarter(s: list[Tensor], a: int, b: int, c: int, d: int) -> None:
    s[a].add_(s[b])  # int32 addition wraps: addition mod 2^32 of the words' bits
    _rotl(s[d].bitwise_xor_(s[a]), 16)
    s[c].add_(s[d])
    _rotl(s[b].bitwise_xor_(s[c]), 12)
    s[a].add_(s[b])
    _rotl(s[d].bitwise_xor_(s[a]), 8)
    s[c].add_(s[d])
    _rotl(s[b].bitwise_xor_(s[c]), 7)


def _block_words(counter: Tensor, key: Sequence[int], nonce: Sequence[int]) -> list[Tensor]:
    """The 16 output words of ChaCha20 blocks, one per counter, as int64 tensors holding uint32 values.

    The state is held in int32 tensors (the words' bits; int32 addition wraps mod 2^32), updated in
    place: 2.7x faster on the CPU than int64 words masked after each addition."""
    u = counter & MASK
    ctr = torch.where(u >= 1 << 31, u - (1 << 32), u).to(torch.int32)
    init: list = [*CONSTANTS, *key, ctr, *nonce]
    s = [w.clone() if isinstance(w, Tensor) else torch.full_like(ctr, _i32(w)) for w in init]
    for _ in range(10):  # 20 rounds: a column round and a diagonal round each
        _quarter(s, 0, 4, 8, 12)
        _quarter(s, 1, 5, 9, 13)
        _quarter(s, 2, 6, 10, 14)
        _quarter(s, 3, 7, 11, 15)
        _quarter(s, 0, 5, 10, 15)
        _quarter(s, 1, 6, 11, 12)
        _quarter(s, 2, 7, 8, 13)
        _quarter(s, 3, 4, 9, 14)
    return [
        (x.add_(w if isinstance(w, Tensor) else _i32(w))).to(torch.int64) & MASK for x, w in zip(s, init, strict=True)
    ]


def chacha20_blocks(counter: Tensor, key: Sequence[int], nonce: Sequence[int]) -> Tensor:
    """ChaCha20 block function (RFC 8439 section 2.3) for each 32-bit block counter in ``counter``
    (an int64 tensor): (N, 16) int64 holding the uint32 state words after the 20 rounds and the add."""
    key, nonce = check_words("chacha20_blocks", key, nonce)
    if counter.dtype != torch.int64 or counter.dim() != 1:
        raise ValueError(
            f"chacha20_blocks: counter must be a 1-d int64 tensor, got {counter.dtype} {tuple(counter.shape)}"
        )
    return torch.stack(_block_words(counter & MASK, key, nonce), dim=1)


def _uniform53(lo: Tensor, hi: Tensor) -> Tensor:
    """(a + 1) 2^-53 with a the top 53 bits of the 64-bit word hi:lo: a uniform on (0, 1], exact in float64."""
    a = (hi << 21) | (lo >> 11)
    return (a + 1).to(torch.float64) * 2.0**-53


def _box_muller_pair(ua: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
    r = torch.sqrt(-2.0 * torch.log(ua))
    t = TWO_PI * ub
    return r * torch.cos(t), r * torch.sin(t)


def secure_gaussian_from_words(w: Sequence[Tensor]) -> Tensor:
    """z = (four Box-Muller normals from the block's first eight words) / 2, float64 (see the module)."""
    c1, s1 = _box_muller_pair(_uniform53(w[0], w[1]), _uniform53(w[2], w[3]))
    c2, s2 = _box_muller_pair(_uniform53(w[4], w[5]), _uniform53(w[6], w[7]))
    return (((c1 + s1) + c2) + s2) * 0.5


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
    """scale * (prev + noise_std * z), z_j the secure Gaussian of ChaCha20 block j under (key, nonce),
    computed in float64 and rounded once to ``dtype`` (a 16-bit dtype through float32, as torch converts
    float64 to it)."""
    key, nonce = check_words("secure_noise", key, nonce)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise ValueError(f"secure_noise: {n} elements exceed the 2**32 a stream numbers; split the parameter")
    out = torch.empty(n, device=device, dtype=torch.float64)
    flat = prev.reshape(-1) if prev is not None else None
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        ctr = torch.arange(lo, hi, device=device, dtype=torch.int64)
        x = noise_std * secure_gaussian_from_words(_block_words(ctr, key, nonce)[:8])
        if flat is not None:
            x = flat[lo:hi].to(torch.float64) + x
        out[lo:hi] = x * scale
    return out.to(dtype).reshape(shape)
