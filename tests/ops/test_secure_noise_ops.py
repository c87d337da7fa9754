"""Secure-mode noise ops on every backend: ChaCha20 against RFC 8439's test vectors and the `cryptography`
library (OpenSSL's ChaCha20), the same words and the same Gaussian stream on the reference, Triton (CPU
interpreter) and the compiled backend (its CPU build: the functors its CUDA kernels run), the epilogue's
formula and single rounding, the sampler's distribution, and the refusals.

Tolerances: the backends compute the same words exactly (compared with ==); their float64 Gaussians
differ only by the last bits of log/cos/sin, which torch, numpy and libm round differently (each within
a few ulp of the exact value; |z| < 9 per Box-Muller term), so they are compared at 1e-13 absolute.
"""

from __future__ import annotations

import os
import struct

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms  # a test dependency: never skipped
from scipy import stats

import dpkernels
from dpkernels import ops
from dpkernels.ops.reference import chacha

RFC_KEY = list(struct.unpack("<8I", bytes(range(32))))
# RFC 8439 2.3.2: key 00:01:..:1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, block counter 1.
RFC_NONCE = list(struct.unpack("<3I", bytes.fromhex("000000090000004a00000000")))
RFC_BLOCK = [
    0xE4E7F110, 0x15593BD1, 0x1FDD0F50, 0xC47120A3, 0xC7F4D1C7, 0x0368C033, 0x9AAA2204, 0x4E6CD4C3,
    0x466482D2, 0x09AA9F07, 0x05D7C214, 0xA2028BD9, 0xD19C12B5, 0xB94E16DE, 0xE883D0CB, 0x4E3C50A2,
]  # fmt: skip
# RFC 8439 A.1 test vector #1: all-zero key and nonce, counter 0; the keystream's first 16 bytes.
A1_FIRST = struct.unpack("<4I", bytes.fromhex("76b8e0ada0f13d90405d6ae55386bd28"))
ALPHA = 1e-6  # KS level, as tests/privacy/test_noise_ks.py


BACKENDS = ["reference", "triton", "cuda"]


def _need(backend: str) -> None:
    if backend == "cuda" and "cuda" not in dpkernels.ops.available_backends():
        if os.environ.get("DPKERNELS_REQUIRE_COMPILED"):
            raise RuntimeError(dpkernels.ops._errors.get("cuda"))
        pytest.skip("the compiled backend (csrc/) cannot be built here")


def _openssl_blocks(key: list[int], nonce: list[int], counter: int, n: int) -> torch.Tensor:
    """n keystream blocks from `cryptography` (16-byte nonce = 32-bit LE counter || 96-bit nonce)."""
    enc = Cipher(
        algorithms.ChaCha20(struct.pack("<8I", *key), struct.pack("<I3I", counter, *nonce)), mode=None
    ).encryptor()
    return torch.tensor(struct.unpack(f"<{16 * n}I", enc.update(bytes(64 * n)))).view(n, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chacha20_rfc8439_vectors_and_openssl(backend):
    _need(backend)
    key = list(struct.unpack("<8I", os.urandom(32)))
    nonce = list(struct.unpack("<3I", os.urandom(12)))
    ctr = torch.tensor([1, 0, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1] + list(range(2, 100)))
    got_rfc = ops.chacha20_blocks(ctr[:1], RFC_KEY, RFC_NONCE, backend=backend)
    assert got_rfc[0].tolist() == RFC_BLOCK
    got_a1 = ops.chacha20_blocks(torch.tensor([0]), [0] * 8, [0] * 3, backend=backend)
    assert tuple(got_a1[0, :4].tolist()) == A1_FIRST
    got = ops.chacha20_blocks(ctr, key, nonce, backend=backend)
    want = torch.stack([_openssl_blocks(key, nonce, int(c), 1)[0] for c in ctr])
    assert torch.equal(got, want)
    assert dpkernels.ops.last_backend["chacha20_blocks"] == backend


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backends_draw_the_reference_stream(backend):
    """The same key and nonce give the same noise on every backend; prev, scale, noise_std and the
    rounding to each dtype as the reference."""
    _need(backend)
    key = list(struct.unpack("<8I", os.urandom(32)))
    nonce = [7, 3, 0]
    n = 256 if backend == "triton" else 4096  # one Triton program: the interpreter is slow
    prev = torch.randn(n, dtype=torch.float64)
    kw = dict(noise_std=0.37, scale=0.25, key=key, nonce=nonce, device="cpu")
    ref = ops.secure_noise(prev, (n,), dtype=torch.float64, backend="reference", **kw)
    got = ops.secure_noise(prev, (n,), dtype=torch.float64, backend=backend, **kw)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-13)
    # Triton: bfloat16 only (its own rounding path; float32 is the float64 path's plain cast): the interpreter is slow
    for dt in (torch.float32, torch.bfloat16) if backend == "cuda" else (torch.bfloat16,):
        ref = ops.secure_noise(None, (n,), dtype=dt, backend="reference", **kw)
        got = ops.secure_noise(None, (n,), dtype=dt, backend=backend, **kw)
        # rounded once from float64 values that agree to 1e-13: equal unless one lies within 1e-13 of a
        # rounding boundary of dt (probability ~1e-13 / 2^-24 = 2e-6 per element): at most one differs
        assert (got != ref).sum() <= 1
        torch.testing.assert_close(got, ref, rtol=2**-7 if dt == torch.bfloat16 else 2**-23, atol=0)
    assert dpkernels.ops.last_backend["secure_noise"] == backend


def test_reference_epilogue_formula_and_single_rounding():
    key, nonce = list(range(8)), [1, 2, 3]
    z = chacha.secure_noise(
        None, (3, 500), noise_std=1.0, scale=1.0, key=key, nonce=nonce, device="cpu", dtype=torch.float64
    )
    # the construction written out from the words, element by element
    w = chacha.chacha20_blocks(torch.arange(1500), key, nonce).T
    torch.testing.assert_close(z.flatten(), chacha.secure_gaussian_from_words(w[:8]), rtol=0, atol=0)
    prev = torch.randn(3, 500)
    out64 = ops.secure_noise(
        prev, (3, 500), noise_std=0.7, scale=0.1, key=key, nonce=nonce, device="cpu", dtype=torch.float64
    )
    torch.testing.assert_close(out64, 0.1 * (prev.double() + 0.7 * z), rtol=1e-15, atol=0)  # float64 reassociation
    out32 = ops.secure_noise(prev, (3, 500), noise_std=0.7, scale=0.1, key=key, nonce=nonce, device="cpu")
    assert out32.dtype == torch.float32 and torch.equal(out32, out64.float())  # one rounding, from the float64 result


def test_uniforms_are_exact_53_bit_and_never_zero():
    lo = torch.tensor([0, 0xFFFFFFFF, 0x7FF, 0x800])
    hi = torch.tensor([0, 0xFFFFFFFF, 0, 0])
    u = chacha._uniform53(lo, hi)
    assert u.tolist() == [2.0**-53, 1.0, 2.0**-53, 2.0 * 2.0**-53]  # the low 11 bits of lo are dropped


def test_secure_gaussian_is_standard_normal():
    """KS on 2^17 values: accepted as N(0, 1), rejected at 0.67x and 1.5x the scale (as test_noise_ks);
    neighbouring elements and streams of adjacent nonces uncorrelated (|r| < 5 / sqrt(n): a 5-sigma bound)."""
    key = list(struct.unpack("<8I", os.urandom(32)))
    n = 1 << 17
    z = ops.secure_noise(
        None, (n,), noise_std=1.0, scale=1.0, key=key, nonce=[0, 0, 0], device="cpu", dtype=torch.float64
    )
    assert stats.kstest(z.numpy(), "norm").pvalue > ALPHA
    for wrong in (0.67, 1.5):
        assert stats.kstest((z / wrong).numpy(), "norm").pvalue < ALPHA
    z2 = ops.secure_noise(
        None, (n,), noise_std=1.0, scale=1.0, key=key, nonce=[1, 0, 0], device="cpu", dtype=torch.float64
    )
    for a, b in ((z[1:], z[:-1]), (z, z2)):
        r = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(r) < 5 / n**0.5


def test_refusals():
    kw = dict(noise_std=1.0, scale=1.0, device="cpu")
    with pytest.raises(ValueError, match="key must be 8 ints"):
        ops.secure_noise(None, (4,), key=[0] * 7, nonce=[0] * 3, **kw)
    with pytest.raises(ValueError, match="nonce must be 3 ints"):
        ops.secure_noise(None, (4,), key=[0] * 8, nonce=[0, 0, 2**32], **kw)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        ops.secure_noise(None, (2**16, 2**16 + 1), key=[0] * 8, nonce=[0] * 3, backend="reference", **kw)
    with pytest.raises(ValueError, match="noise_std"):
        ops.secure_noise(None, (4,), key=[0] * 8, nonce=[0] * 3, noise_std=-1.0, scale=1.0, device="cpu")
