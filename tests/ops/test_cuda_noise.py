"""The compiled backend's noise: its Philox4x32-10 against the Random123 paper's known answers and a
Python reimplementation, its normals against the same transform in numpy and against the Triton
backend's stream (the same numbers by design), their statistics, and the epilogue of every clipped sum
drawing exactly add_noise's z. The CUDA build's stream against the CPU's runs on a GPU (mark gpu)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _compiled import compiled_backend
from scipy import stats

cu = compiled_backend()
M32 = 0xFFFFFFFF

# Known-answer vectors of philox4x32-10 (Random123's kat_vectors; Salmon et al., SC'11):
# (counter, key, output), 32-bit words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def py_philox(ctr, key):
    """Philox4x32-10 in plain Python integers."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def py_randn(seed, n):
    """z_j for j < n: Philox on counter (j_lo, j_hi, 0, 0), key (seed_lo, seed_hi), Box-Muller in float32."""
    words = np.array([py_philox((j & M32, j >> 32, 0, 0), (seed & M32, seed >> 32))[:2] for j in range(n)])
    i = words.astype(np.uint32).view(np.int32)
    u = np.where(i < 0, ~i, i).astype(np.float32) * np.float32(4.6566127342e-10)
    u1 = np.maximum(np.float32(1e-7), u[:, 0])
    th = np.float32(6.283185307179586) * u[:, 1]
    return np.sqrt(np.float32(-2.0) * np.log(u1)) * np.cos(th)


def _philox_op(ctr, key, device="cpu"):
    out = torch.ops.dpkernels.cuda_philox(torch.tensor(ctr, dtype=torch.int64, device=device), *key)
    return [tuple(int(w) for w in row) for row in out.cpu()]


def test_python_philox_known_answers():
    for ctr, key, want in KAT:
        assert py_philox(ctr, key) == want


def test_host_philox_known_answers():
    for ctr, key, want in KAT:
        assert _philox_op([ctr], key) == [want]


def test_host_philox_matches_python():
    g = torch.Generator().manual_seed(0)
    ctr = torch.randint(0, 1 << 32, (64, 4), generator=g).tolist()
    key = (0x12345678, 0x9ABCDEF0)
    assert _philox_op(ctr, key) == [py_philox(tuple(c), key) for c in ctr]


def _noise(seed, shape=(64, 64), dtype=torch.float32, device="cpu"):
    return cu.add_noise(None, shape, noise_std=1.0, scale=1.0, seed=seed, device=device, dtype=dtype)


@pytest.mark.parametrize("seed", [0, 7, (1 << 63) - 1, 3 + (1 << 40)])
def test_normals_match_python(seed):
    z = _noise(seed, (37,)).numpy()
    # host logf/cosf against numpy's float32 log/cos: equal to a few ulps of |z| <= 6
    np.testing.assert_allclose(z, py_randn(seed, 37), rtol=0, atol=4e-6)


def test_same_stream_as_triton():
    tt = pytest.importorskip("dpkernels.ops.triton")
    for seed, shape in [(5, (33, 17)), ((1 << 63) - 1, (100,))]:
        want = tt.add_noise(None, shape, noise_std=1.0, scale=1.0, seed=seed, device="cpu")
        torch.testing.assert_close(_noise(seed, shape), want, rtol=0, atol=4e-6)


def test_standard_normal():
    n = 1 << 16
    z = _noise(12345, (n,)).double()
    assert abs(z.mean().item()) < 4.5 / math.sqrt(n)  # 4.5 sigma: a correct generator fails w.p. 7e-6
    assert abs(z.var().item() - 1) < 4.5 * math.sqrt(2 / n)
    # KS at alpha = 1e-3 (deterministic for the fixed seed); a wrong radius or a uniform fails with p < 1e-30
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_deterministic_and_seed_dependent():
    assert torch.equal(_noise(3), _noise(3))
    assert not torch.equal(_noise(3), _noise(4))
    assert not torch.equal(_noise(5), _noise(5 + (1 << 40)))  # the high 32 bits of the seed count
    x, y = _noise(1).double().flatten(), _noise(2).double().flatten()
    assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 4.5 / math.sqrt(x.numel())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_add_noise_dtypes(dtype):
    """Drawn in fp32 for every dtype (widened for fp64, rounded once for 16-bit)."""
    prev = torch.randn(8, 9, dtype=torch.float64)
    out = cu.add_noise(prev.to(dtype), (8, 9), noise_std=0.5, scale=2.0, seed=11, device="cpu", dtype=dtype)
    assert out.dtype == dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want = 2.0 * (prev.to(dtype).to(acc) + 0.5 * _noise(11, (8, 9)).to(acc))
    torch.testing.assert_close(out, want.to(dtype), rtol=0, atol=0)


def test_epilogues_draw_add_noise():
    """Every clipped sum's noise is add_noise's z for its seed and output shape (a tensor gets the same
    noise whichever op writes it), and covers every element: the embedding table's untouched rows too."""
    g = torch.Generator().manual_seed(1)
    a, gr, c = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 6, generator=g), torch.rand(3, generator=g)
    s, sc = 0.7, 0.5

    def z(seed, shape):
        return s * sc * _noise(seed, shape)

    kw = dict(bias=True, scale=sc, seed_w=21, seed_b=22)
    (w1, b1), (w0, b0) = cu.linear_clipped_sum(a, gr, c, noise_std=s, **kw), cu.linear_clipped_sum(a, gr, c, **kw)
    torch.testing.assert_close(w1 - w0, z(21, (6, 5)))
    torch.testing.assert_close(b1 - b0, z(22, (6,)))
    xh = torch.randn(3, 4, 6, generator=g)
    kw = dict(weight=True, bias=True, scale=sc, seed_w=23, seed_b=24)
    (w1, b1), (w0, b0) = cu.affine_clipped_sum(xh, gr, c, noise_std=s, **kw), cu.affine_clipped_sum(xh, gr, c, **kw)
    torch.testing.assert_close(w1 - w0, z(23, (6,)))
    torch.testing.assert_close(b1 - b0, z(24, (6,)))
    ids = torch.tensor([[0, 0, 2, 2]] * 3)
    kw = dict(num_embeddings=9, padding_idx=2, scale=sc, seed=25)
    e1, e0 = cu.embedding_clipped_sum(ids, gr, c, noise_std=s, **kw), cu.embedding_clipped_sum(ids, gr, c, **kw)
    torch.testing.assert_close(e1 - e0, z(25, (9, 6)))
    assert (e0[1:] == 0).all() and (e1[1:] != 0).all()  # rows no sample touched (and the padding row) noised


@pytest.mark.gpu
def test_device_stream_equals_host():
    """The CUDA build's Philox and normals against the CPU's (the same function compiled both ways)."""
    if not torch.cuda.is_available() or not cu.info["cuda"]:
        pytest.skip("needs a GPU and the CUDA build of the library")
    g = torch.Generator().manual_seed(0)
    ctr = torch.randint(0, 1 << 32, (4096, 4), generator=g).tolist()
    assert _philox_op(ctr, (1, 2), "cuda") == _philox_op(ctr, (1, 2))
    for seed in (0, 99, (1 << 63) - 1):
        # device logf/cosf are within 2 ulp of the host's
        got = _noise(seed, (1000, 33), device="cuda").cpu()
        torch.testing.assert_close(got, _noise(seed, (1000, 33)), rtol=0, atol=4e-6)
