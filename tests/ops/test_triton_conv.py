"""Triton conv ops (implicit GEMM) vs naive per-sample gradients and the reference, under TRITON_INTERPRET=1.

The geometries are tiny (the interpreter runs every program in Python) but cover what the index
arithmetic can get wrong: stride, zero padding, dilation, groups, anisotropic kernels, 1x1 kernels,
a single output position (T = 1), B = 0 and B = 1, odd sizes, 1-d, 2-d and 3-d. Some cross the
kernels' blocks: T = 81 > 64 gives two Gram tiles (the off-diagonal pair counted twice), d = 135 >
128 two d-tiles and p = 66 > 64 two p-tiles of the float64 kernels.
"""

from __future__ import annotations

import importlib
import math

import _naive as naive
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _device import DEVICE
from scipy import stats

import dpkernels
from dpkernels import ops
from dpkernels.ops import reference as ref

tt = pytest.importorskip("dpkernels.ops.triton")
tconv = importlib.import_module("dpkernels.ops.triton.conv")

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# name -> (B, C_in, C_out, groups, kernel, stride, padding, dilation, input size, bias)
CASES = {
    "1d-s2-p1-d2-g2": (2, 4, 6, 2, (3,), (2,), (1,), (2,), (11,), True),
    "1d-two-tiles-d-p": (1, 27, 66, 1, (5,), (1,), (2,), (1,), (7,), True),
    "2d-3x3-T81": (2, 3, 4, 1, (3, 3), (1, 1), (1, 1), (1, 1), (9, 9), True),
    "2d-aniso-g3": (2, 3, 6, 3, (2, 3), (2, 1), (0, 1), (1, 2), (7, 6), False),
    "2d-1x1-s2-B1": (1, 5, 3, 1, (1, 1), (2, 2), (0, 0), (1, 1), (5, 4), True),
    "2d-T1": (3, 2, 5, 1, (3, 3), (1, 1), (0, 0), (1, 1), (3, 3), True),
    "2d-B0": (0, 2, 3, 1, (3, 3), (1, 1), (1, 1), (1, 1), (4, 5), True),
    "3d": (2, 2, 4, 2, (2, 2, 2), (1, 2, 1), (1, 0, 1), (2, 1, 1), (4, 5, 3), True),
}


@pytest.fixture(autouse=True)
def _ieee_fp32():
    # The fp32 tolerances assume IEEE fp32 dots, which the kernels use while torch's matmul precision
    # is "highest" (the default); see _common.dot_precision.
    assert torch.get_float32_matmul_precision() == "highest"


def _out(S, k, s, p, d):
    return tuple((S[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(len(S)))


def _make(name, dtype=torch.float64, seed=0):
    """x, g, c and the geometry of CASES[name], drawn in float64 and rounded to ``dtype``."""
    B, cin, cout, groups, k, s, p, d, S, bias = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cin, *S, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE, dtype)
    g = torch.randn(B, cout, *_out(S, k, s, p, d), generator=gen, dtype=torch.float64, device="cpu").to(DEVICE, dtype)
    c = torch.rand(B, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE, dtype)
    geom = dict(stride=s, padding=p, dilation=d, groups=groups)
    return x, g, c, geom, (cout, cin // groups, *k), bias


def _csum(c, gw):
    """sum_i c_i grad_i, in float64."""
    return (c.double().view(-1, *[1] * (gw.dim() - 1)) * gw).sum(0)


def _snr_db(x, ref_x):
    """Signal-to-noise ratio of x against ref_x in dB (inf when equal)."""
    err = (x.double() - ref_x.double()).square().sum()
    return (10 * torch.log10(ref_x.double().square().sum() / err)).item() if err > 0 else float("inf")


# fp64: a float64 sum of n terms is off by at most n * 1.1e-16 relative to the sum of |terms|; the
# largest sums here have n <= T^2 + d + p < 7000 terms, so < 1e-12: rtol 1e-10 leaves a 100x margin,
# while a wrong address (a shifted window, a missed padding zero, a wrong group) changes results at O(1).
FP64 = dict(rtol=1e-10, atol=1e-10)
# fp32 against float64 truth on the same inputs: the same bound with eps = 6e-8 is ~4e-4 worst case,
# ~sqrt(n) eps ~ 5e-6 for independent rounding errors; rtol 1e-4 keeps a 20x margin over the latter.
# atol only matters for entries near 0 (values are O(1)-O(100)).
FP32 = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_fp64_match_naive(name):
    """Norms (ghost and inst) and the clipped sum with prev and scale, against per-sample gradients."""
    x, g, c, geom, ws, bias = _make(name)
    B = x.shape[0]
    gw, gb = naive.conv(x, g, ws, **geom)
    for method in ("ghost", "inst"):
        nw, nb = tt.conv_norms(x, g, kernel_size=ws[2:], bias=bias, method=method, **geom)
        assert nw.dtype == torch.float64 and nw.shape == (B,)
        torch.testing.assert_close(nw, gw.flatten(1).square().sum(1), **FP64)
        if bias:
            torch.testing.assert_close(nb, gb.square().sum(1), **FP64)
        else:
            assert nb is None

    gen = torch.Generator().manual_seed(1)
    prev_w = torch.randn(ws, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE)
    prev_b = torch.randn(ws[0], generator=gen, dtype=torch.float64, device="cpu").to(DEVICE)
    w, b = tt.conv_clipped_sum(
        x, g, c, weight_shape=ws, bias=bias, scale=0.25, seed_w=3, seed_b=4, prev_w=prev_w, prev_b=prev_b, **geom
    )
    assert w.shape == ws and w.dtype == torch.float64
    torch.testing.assert_close(w, 0.25 * (prev_w + _csum(c, gw)), **FP64)
    if bias:
        torch.testing.assert_close(b, 0.25 * (prev_b + _csum(c, gb)), **FP64)
    else:
        assert b is None


def test_split_k_matches_fused():
    """The split-K workspace + finish kernel gives the fused kernel's sum (and the reference's)."""
    x, g, c, geom, ws, _ = _make("2d-3x3-T81")
    prev_w, prev_b = torch.randn(ws, dtype=torch.float64), torch.randn(ws[0], dtype=torch.float64)
    kw = dict(weight_shape=ws, bias=True, noise_std=0.0, scale=0.5, seed_w=0, seed_b=0, prev_w=prev_w, prev_b=prev_b)
    w3, b3 = tconv.launch_clipped_sum(x, g, c, splits=3, **kw, **geom)
    wr, br = ref.conv_clipped_sum(x, g, c, **kw, **geom)
    torch.testing.assert_close(w3, wr, **FP64)
    torch.testing.assert_close(b3, br, **FP64)


@pytest.mark.parametrize("name", ["2d-3x3-T81", "2d-aniso-g3"])
def test_fp32(name):
    x, g, c, geom, ws, bias = _make(name, torch.float32)
    gw, gb = naive.conv(x, g, ws, **geom)  # float64 truth on the same (fp32-representable) inputs
    for method in ("ghost", "inst"):
        nw, nb = tt.conv_norms(x, g, kernel_size=ws[2:], bias=True, method=method, **geom)
        assert nw.dtype == torch.float32
        torch.testing.assert_close(nw.double(), gw.flatten(1).square().sum(1), **FP32)
        torch.testing.assert_close(nb.double(), gb.square().sum(1), **FP32)
    w, b = tt.conv_clipped_sum(x, g, c, weight_shape=ws, bias=True, **geom)
    assert w.dtype == b.dtype == torch.float32
    torch.testing.assert_close(w.double(), _csum(c, gw), **FP32)
    torch.testing.assert_close(b.double(), _csum(c, gb), **FP32)


@pytest.mark.parametrize("dtype, sum_db", [(torch.bfloat16, 40), (torch.float16, 55)])
def test_half_by_snr(dtype, sum_db):
    # Norms: a product of two 16-bit floats is exact in fp32, so with fp32 accumulation the norms of
    # half inputs are as accurate as fp32 ones (~1e-6 relative, > 100 dB); 60 dB still flags a kernel
    # that rounds its Gram or gradient tiles to 16 bits (~50 dB for bf16).
    # Clipped sum: c_i g_it is rounded to the input dtype once (tensor cores multiply 16-bit operands):
    # <= 2^-9 (bf16) / 2^-12 (fp16) relative per term, so SNR ~ 59 / ~77 dB; the bars keep ~20 dB of
    # margin and still fail a dropped tile or a missing clip factor (<< 40 dB). The bias sums in fp32.
    x, g, c, geom, ws, _ = _make("2d-3x3-T81", dtype)
    gw, gb = naive.conv(x, g, ws, **geom)
    for method in ("ghost", "inst"):
        nw, nb = tt.conv_norms(x, g, kernel_size=ws[2:], bias=True, method=method, **geom)
        assert nw.dtype == torch.float32  # half inputs accumulate and return in fp32, as the reference
        assert _snr_db(nw, gw.flatten(1).square().sum(1)) > 60
        assert _snr_db(nb, gb.square().sum(1)) > 60
    w, b = tt.conv_clipped_sum(x, g, c, weight_shape=ws, bias=True, **geom)
    assert w.dtype == torch.float32
    assert _snr_db(w, _csum(c, gw)) > sum_db
    assert _snr_db(b, _csum(c, gb)) > 90  # fp32 sums of exact products


@pytest.mark.parametrize("c_scale", [3000.0, 1e-8])
def test_clipped_sum_fp16_products_stay_in_range(c_scale):
    """fp16 products c_i g_it past 65504 (c up to 3000, |g| up to ~70: once inf, NaN weights) or below
    6e-8 (c up to 1e-8: once flushed to 0) are block-scaled into fp16's range (_common.fp16_block_scale):
    as accurate as c in [0, 1], the bar of test_half_by_snr, with and without split-K."""
    x, g, c, geom, ws, _ = _make("2d-3x3-T81", torch.float16)
    g, c = g * 16, c.float() * c_scale
    gw, _ = naive.conv(x, g, ws, **geom)
    for splits in (1, 3):
        w, _ = tconv.launch_clipped_sum(
            x,
            g,
            c,
            ws,
            **geom,
            bias=False,
            noise_std=0.0,
            scale=1.0,
            seed_w=0,
            seed_b=0,
            prev_w=None,
            prev_b=None,
            splits=splits,
        )
        assert torch.isfinite(w).all()
        assert _snr_db(w, _csum(c, gw)) > 55


def test_strided_and_mixed_inputs():
    """A channels-last x is read through its strides; x and g of different dtypes are promoted."""
    x, g, c, geom, ws, _ = _make("2d-aniso-g3")
    xc = x.to(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    gw, _ = naive.conv(x, g, ws, **geom)
    nw, _ = tt.conv_norms(xc, g, kernel_size=ws[2:], bias=False, method="inst", **geom)
    torch.testing.assert_close(nw, gw.flatten(1).square().sum(1), **FP64)
    w, _ = tt.conv_clipped_sum(xc, g, c, weight_shape=ws, bias=False, **geom)
    torch.testing.assert_close(w, _csum(c, gw), **FP64)
    nw, _ = tt.conv_norms(x.float(), g.to(torch.bfloat16), kernel_size=ws[2:], bias=False, method="ghost", **geom)
    assert nw.dtype == torch.float32


# ----------------------------------------------------------------------------- noise epilogue

NOISE_WS = (64, 16, 4, 4)  # 16384 weights: two d-tiles, four 16-row epilogue slices per program
N = math.prod(NOISE_WS)
Z = 4.5  # sigma; a correct N(0, 1) exceeds it with probability 7e-6 per check (as test_triton_noise.py)


def _empty_batch():
    x = torch.zeros(0, NOISE_WS[1], 4, 4)
    g = torch.zeros(0, NOISE_WS[0], 1, 1)
    return x, g, torch.zeros(0)


def test_noise_is_add_noise_and_standard_normal():
    """With no samples the clipped sum is scale * noise_std * z; z is exactly add_noise's stream for
    the weight's (and the bias's) shape and seed, and standard normal."""
    x, g, c = _empty_batch()
    kw = dict(weight_shape=NOISE_WS, stride=1, padding=0, dilation=1, groups=1, bias=True)
    w, b = tt.conv_clipped_sum(x, g, c, noise_std=1.0, seed_w=99, seed_b=98, **kw)
    z = w.double().flatten()
    assert abs(z.mean().item()) < Z / math.sqrt(N)
    assert abs(z.var().item() - 1) < Z * math.sqrt(2 / N)  # var of a normal sample variance: 2/N
    # alpha = 1e-3 with the seed fixed: deterministic; a uniform or mis-scaled stream has p < 1e-30 here
    assert stats.kstest(z.cpu().numpy(), "norm").pvalue > 1e-3
    torch.testing.assert_close(w, tt.add_noise(None, NOISE_WS, noise_std=1.0, scale=1.0, seed=99, device=DEVICE))
    torch.testing.assert_close(b, tt.add_noise(None, (NOISE_WS[0],), noise_std=1.0, scale=1.0, seed=98, device=DEVICE))
    # the std scales with noise_std * scale (exactly: the same draws)
    w2, _ = tt.conv_clipped_sum(x, g, c, noise_std=0.5, scale=0.25, seed_w=99, seed_b=98, **kw)
    torch.testing.assert_close(w2, 0.125 * w, rtol=0, atol=0)  # scaled by powers of two: exact


def test_noise_deterministic_seeded_and_on_every_path():
    """Same seed, same noise; another seed, other noise; fused and split-K epilogues draw the same z,
    and noisy - noiseless is exactly that z (up to fp32 rounding of the sum)."""
    x, g, c, geom, ws, _ = _make("1d-s2-p1-d2-g2", torch.float32)
    kw = dict(weight_shape=ws, bias=True, scale=2.0, prev_w=None, prev_b=None, **geom)
    w1, b1 = tt.conv_clipped_sum(x, g, c, noise_std=0.5, seed_w=21, seed_b=22, **kw)
    w1b, b1b = tt.conv_clipped_sum(x, g, c, noise_std=0.5, seed_w=21, seed_b=22, **kw)
    torch.testing.assert_close(w1, w1b, rtol=0, atol=0)
    torch.testing.assert_close(b1, b1b, rtol=0, atol=0)
    w2, _ = tt.conv_clipped_sum(x, g, c, noise_std=0.5, seed_w=23, seed_b=22, **kw)
    assert not torch.equal(w1, w2)
    w3, b3 = tconv.launch_clipped_sum(x, g, c, noise_std=0.5, seed_w=21, seed_b=22, splits=2, **kw)
    clean, cleanb = tt.conv_clipped_sum(x, g, c, noise_std=0.0, **kw)
    zw = tt.add_noise(None, ws, noise_std=0.5, scale=2.0, seed=21, device=DEVICE)
    zb = tt.add_noise(None, (ws[0],), noise_std=0.5, scale=2.0, seed=22, device=DEVICE)
    for noisy, nb in ((w1, b1), (w3, b3)):
        # |entries| <~ 30: atol 1e-4 is ~10 fp32 ulp of the sum
        torch.testing.assert_close(noisy - clean, zw, rtol=0, atol=1e-4)
        torch.testing.assert_close(nb - cleanb, zb, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- dispatch, fallback, errors


def test_dispatcher_serves_triton():
    x, g, c, geom, ws, _ = _make("2d-1x1-s2-B1")
    nw, nb = ops.conv_norms(x, g, kernel_size=ws[2:], bias=True, method="ghost", backend="triton", **geom)
    assert ops.last_backend["conv_norms"] == "triton"
    rw, rb = ref.conv_norms(x, g, kernel_size=ws[2:], bias=True, method="ghost", **geom)
    torch.testing.assert_close(nw, rw, **FP64)
    torch.testing.assert_close(nb, rb, **FP64)
    w, b = ops.conv_clipped_sum(x, g, c, weight_shape=ws, bias=True, scale=0.5, backend="triton", **geom)
    assert ops.last_backend["conv_clipped_sum"] == "triton"
    wr, br = ref.conv_clipped_sum(x, g, c, weight_shape=ws, bias=True, scale=0.5, **geom)
    torch.testing.assert_close(w, wr, **FP64)
    torch.testing.assert_close(b, br, **FP64)


def test_unsupported_cases_call_the_reference(monkeypatch):
    """Four spatial dims (no torch conv has them, but the reference's unfold does) and empty channels
    go to the reference op, explicitly; the kernels are not launched."""
    calls = []
    real = tconv.ref_conv.conv_norms
    monkeypatch.setattr(tconv.ref_conv, "conv_norms", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(tconv, "launch", lambda *a, **k: pytest.fail("a kernel was launched"))
    x = torch.randn(2, 2, 3, 3, 3, 3, dtype=torch.float64)
    g = torch.randn(2, 3, 2, 2, 2, 2, dtype=torch.float64)
    geom = dict(kernel_size=2, stride=1, padding=0, dilation=1, groups=1)
    nw, nb = tt.conv_norms(x, g, bias=True, method="inst", **geom)
    assert calls == [1]
    torch.testing.assert_close(nw, real(x, g, bias=True, method="ghost", **geom)[0], **FP64)  # the two methods agree
    nw, _ = tt.conv_norms(torch.zeros(2, 0, 5), torch.zeros(2, 0, 4), bias=False, method="ghost", **geom)
    assert calls == [1, 1] and nw.shape == (2,) and not nw.any()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs_name_the_op_and_argument(backend):
    """The dispatcher checks the inputs before any backend (ops._validate): the same errors on both."""
    x, g, c, geom, ws, _ = _make("2d-aniso-g3", torch.float32)
    with pytest.raises(ValueError, match="conv_norms: method"):
        ops.conv_norms(x, g, kernel_size=ws[2:], bias=True, method="fast", **geom, backend=backend)
    with pytest.raises(ValueError, match="conv_norms: groups=2 must be an int >= 1 dividing C_in=3"):
        ops.conv_norms(x, g, kernel_size=ws[2:], bias=True, method="ghost", **{**geom, "groups": 2}, backend=backend)
    with pytest.raises(ValueError, match="does not match the 12 output positions"):
        ops.conv_norms(x, g[..., :-1], kernel_size=ws[2:], bias=True, method="ghost", **geom, backend=backend)
    with pytest.raises(ValueError, match="conv_norms: kernel_size must be"):
        ops.conv_norms(x, g, kernel_size=(2, 3, 3), bias=True, method="ghost", **geom, backend=backend)
    with pytest.raises(TypeError, match="conv_norms: x must be a float16"):
        ops.conv_norms(x.int(), g, kernel_size=ws[2:], bias=True, method="ghost", **geom, backend=backend)
    with pytest.raises(ValueError, match="conv_clipped_sum: weight_shape"):
        ops.conv_clipped_sum(x, g, c, weight_shape=(6, 2, 2, 3), bias=True, **geom, backend=backend)
    with pytest.raises(ValueError, match="conv_clipped_sum: c must"):
        ops.conv_clipped_sum(x, g, c[:1], weight_shape=ws, bias=True, **geom, backend=backend)
    with pytest.raises(ValueError, match="prev_w must have"):
        ops.conv_clipped_sum(x, g, c, weight_shape=ws, bias=True, prev_w=torch.zeros(6, 1), **geom, backend=backend)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        ops.conv_norms(x[..., :2], g, kernel_size=(2, 5), bias=False, method="ghost", **geom, backend=backend)


# ----------------------------------------------------------------------------- torch.library


def _op_cases():
    x, g, c, geom, ws, _ = _make("1d-s2-p1-d2-g2", torch.float32)
    s, p, d, groups = list(geom["stride"]), list(geom["padding"]), list(geom["dilation"]), geom["groups"]
    pw, pb = torch.randn(ws), torch.randn(ws[0])
    k = list(ws[2:])
    dk = torch.ops.dpkernels
    return [
        (dk.triton_conv_norms_ghost.default, (x, g, k, s, p, d, groups, True)),
        (dk.triton_conv_norms_inst.default, (x, g, k, s, p, d, groups, True)),
        (dk.triton_conv_clipped_sum.default, (x, g, c, list(ws), s, p, d, groups, True, 0.5, 0.25, 3, 4, pw, pb)),
    ]


@pytest.mark.parametrize("case", range(3))
def test_opcheck(case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- end to end


def test_make_private_step_matches_reference():
    """One noiseless DP-SGD step of a tiny Conv2d + GroupNorm + Linear model gives the same gradients
    and parameters with the triton backend as with the reference backend."""

    def run(backend):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, stride=2),
            nn.GroupNorm(2, 4),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, 3),
        ).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = dpkernels.make_private(
            model, opt, noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=4.0, loss_reduction="mean"
        )
        dpkernels.set_backend(backend)
        x = torch.randn(5, 2, 5, 5, dtype=torch.float64)
        y = torch.randn(5, 3, dtype=torch.float64)
        ((model(x) - y) ** 2).sum(1).mean().backward()
        opt.step()
        served = dict(ops.last_backend)
        dpkernels.set_backend(None)
        return [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()], served

    g_ref, p_ref, _ = run("reference")
    g_tri, p_tri, served = run("triton")
    assert served["conv_norms"] == served["conv_clipped_sum"] == "triton"
    assert all(g.abs().sum() > 0 for g in g_ref)  # a real step, not all-zero gradients
    for a, b in zip(g_tri + p_tri, g_ref + p_ref):
        torch.testing.assert_close(a, b, **FP64)
