"""Triton affine (LayerNorm / RMSNorm / GroupNorm weight and bias) ops vs naive per-sample gradients and
the reference, under TRITON_INTERPRET=1.

Shapes cross the kernels' blocks: C = 130 > 128 channels gives two C-tiles, T = 17 > 16 two row steps
of the norms kernel, B * T = 70 > 16 five row steps of the clipped sum (and three row splits when
forced); B = 0, B = 1 and T = 1 are included.
"""

from __future__ import annotations

import importlib
import math

import _naive as naive
import pytest
import torch
import torch.nn as nn
from _device import DEVICE

import dpkernels
from dpkernels import ops
from dpkernels.ops import reference as ref

tt = pytest.importorskip("dpkernels.ops.triton")
taff = importlib.import_module("dpkernels.ops.triton.affine")

# (B, T, C)
SHAPES = [(0, 3, 4), (1, 1, 5), (3, 5, 7), (2, 17, 130), (7, 10, 3)]
FLAGS = [(True, True), (True, False), (False, True)]


def _case(B, T, C, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE, dtype)
    g = torch.randn(B, T, C, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE, dtype)
    c = torch.rand(B, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE, dtype)
    return x, g, c


def _snr_db(x, ref_x):
    err = (x.double() - ref_x.double()).square().sum()
    return (10 * torch.log10(ref_x.double().square().sum() / err)).item() if err > 0 else float("inf")


# fp64: every result is a sum of at most B * T + C <= 170 products of O(1) values: rounding below
# ~170 * 1.1e-16 ~ 2e-14 relative, rtol 1e-10 a wide margin; a lost tile or row step is an O(1) error.
FP64 = dict(rtol=1e-10, atol=1e-10)
# fp32 against float64 truth: the same <= 170-term sums with eps = 6e-8 give <= 1e-5 worst case for the
# norms (sums of squares of sums); rtol 1e-4 keeps a 10x margin. atol covers the empty (B = 0) results.
FP32 = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_norms_fp64_match_naive(shape):
    x, g, _ = _case(*shape)
    gw, gb = naive.affine(x, g)
    for weight, bias in FLAGS:
        w, b = tt.affine_norms(x, g, weight=weight, bias=bias)
        assert (w is None) != weight and (b is None) != bias
        if weight:
            assert w.dtype == torch.float64 and w.shape == (shape[0],)
            torch.testing.assert_close(w, gw.square().sum(1), **FP64)
        if bias:
            torch.testing.assert_close(b, gb.square().sum(1), **FP64)


def test_norms_fp32_and_strided():
    """GroupNorm's rows are a transposed view, (B, C, HW) -> (B, HW, C): read through the strides."""
    x, g, _ = _case(3, 17, 20, torch.float32)
    gw, gb = naive.affine(x, g)
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)
    gs = g.transpose(1, 2).contiguous().transpose(1, 2)
    assert xs.stride() == (340, 1, 17)
    w, b = tt.affine_norms(xs, gs, weight=True, bias=True)
    assert w.dtype == b.dtype == torch.float32
    torch.testing.assert_close(w.double(), gw.square().sum(1), **FP32)
    torch.testing.assert_close(b.double(), gb.square().sum(1), **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norms_half(dtype):
    # A product of two 16-bit values is exact in fp32 and the kernel accumulates in fp32, so the norms
    # are as accurate as fp32 ones (> 100 dB); 60 dB fails a kernel that rounds xhat * g or the
    # per-sample sums to 16 bits (~50 dB for bf16).
    x, g, _ = _case(3, 17, 130, dtype)
    gw, gb = naive.affine(x, g)
    w, b = tt.affine_norms(x, g, weight=True, bias=True)
    assert w.dtype == torch.float32
    assert _snr_db(w, gw.square().sum(1)) > 60
    assert _snr_db(b, gb.square().sum(1)) > 60


@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_clipped_sum_fp64_matches_naive(shape, splits):
    """scale * (prev + sum_i c_i grad_i): the fused epilogue (one row split) and the split workspace +
    add_noise.finish (three) give the same result."""
    B, T, C = shape
    x, g, c = _case(*shape)
    gw, gb = naive.affine(x, g)
    prev_w, prev_b = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    exp_w = 0.25 * (prev_w + (c[:, None] * gw).sum(0))
    exp_b = 0.25 * (prev_b + (c[:, None] * gb).sum(0))
    kw = dict(noise_std=0.0, scale=0.25, seed_w=1, seed_b=2, prev_w=prev_w, prev_b=prev_b)
    w, b = taff.launch_clipped_sum(x, g, c, weight=True, bias=True, splits=splits, **kw)
    assert w.dtype == torch.float64 and w.shape == (C,)
    torch.testing.assert_close(w, exp_w, **FP64)
    torch.testing.assert_close(b, exp_b, **FP64)
    w, b = tt.affine_clipped_sum(x, g, c, weight=False, bias=True, **kw)
    assert w is None
    torch.testing.assert_close(b, exp_b, **FP64)
    w, b = tt.affine_clipped_sum(x, g, c, weight=True, bias=False)  # no prev, scale 1
    assert b is None
    torch.testing.assert_close(w, (c[:, None] * gw).sum(0), **FP64)


@pytest.mark.parametrize("dtype, min_db", [(torch.float32, 120), (torch.bfloat16, 90), (torch.float16, 90)])
def test_clipped_sum_low_precision(dtype, min_db):
    # c_i * xhat * g is formed and summed in fp32, never rounded to 16 bits: relative error ~ sqrt(n) *
    # 6e-8, SNR ~ 140 dB for every input dtype. The bars keep >= 20 dB of margin and fail any 16-bit
    # rounding of the products (bf16: ~59 dB).
    x, g, c = _case(3, 17, 130, dtype)
    gw, gb = naive.affine(x, g)
    w, b = tt.affine_clipped_sum(x, g, c, weight=True, bias=True)
    assert w.dtype == torch.float32
    assert _snr_db(w, (c.double()[:, None] * gw).sum(0)) > min_db
    assert _snr_db(b, (c.double()[:, None] * gb).sum(0)) > min_db


# ----------------------------------------------------------------------------- noise

Z = 4.5  # sigma bound of the statistical checks: a correct N(0, 1) exceeds it with probability 7e-6


@pytest.mark.parametrize("splits", [None, 3])
def test_noise(splits):
    """The noise is the shared Philox stream of a (C,) tensor for each seed (what add_noise gives), the
    same in the fused epilogue and after a split (B * T = 70 rows: three splits of 32); its empirical
    std is scale * noise_std. (The stream's own statistics are tested in test_triton_noise.py.)"""
    C = 2048
    x, g, c = _case(*((1, 1) if splits is None else (2, 35)), C, torch.float32)
    kw = dict(weight=True, bias=True, scale=0.5, splits=splits, prev_w=None, prev_b=None)
    cw, cb = taff.launch_clipped_sum(x, g, c, noise_std=0.0, seed_w=0, seed_b=0, **kw)
    nw, nb = taff.launch_clipped_sum(x, g, c, noise_std=3.0, seed_w=11, seed_b=12, **kw)
    for clean, noisy, seed in ((cw, nw, 11), (cb, nb, 12)):
        z = tt.add_noise(None, (C,), noise_std=3.0, scale=0.5, seed=seed, device=DEVICE)
        # fp32: two roundings of O(1) values apart from the fused result
        torch.testing.assert_close(noisy, clean + z, rtol=1e-5, atol=1e-5)
        noise = (noisy - clean).double()
        assert abs(noise.mean().item()) < Z * 1.5 / math.sqrt(C)
        assert abs(noise.std().item() / 1.5 - 1) < Z * math.sqrt(1 / (2 * C))  # std of a sample std
    assert abs(torch.corrcoef(torch.stack([nw - cw, nb - cb]))[0, 1].item()) < Z / math.sqrt(C)  # two seeds


def test_noise_deterministic_and_empty_batch():
    x, g, c = _case(2, 3, 9, torch.float32)
    kw = dict(weight=True, bias=True, noise_std=1.0, seed_w=5, seed_b=6)
    a = tt.affine_clipped_sum(x, g, c, **kw)
    for p, q in zip(a, tt.affine_clipped_sum(x, g, c, **kw)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert not torch.equal(a[0], tt.affine_clipped_sum(x, g, c, **{**kw, "seed_w": 7})[0])
    prev = torch.randn(9)
    w, _ = tt.affine_clipped_sum(x[:0], g[:0], c[:0], **kw, prev_w=prev)  # B = 0: prev plus noise only
    torch.testing.assert_close(w, tt.add_noise(prev, (9,), noise_std=1.0, scale=1.0, seed=5, device=DEVICE))


# ----------------------------------------------------------------------------- dispatch, errors, library


def test_dispatcher_serves_triton():
    x, g, c = _case(2, 6, 5)
    dpkernels.set_backend("triton")
    w, b = ops.affine_norms(x, g, weight=True, bias=True)
    assert ops.last_backend["affine_norms"] == "triton"
    wr, br = ref.affine_norms(x, g, weight=True, bias=True)
    torch.testing.assert_close(w, wr, **FP64)
    torch.testing.assert_close(b, br, **FP64)
    w, b = ops.affine_clipped_sum(x, g, c, weight=True, bias=True, scale=0.5)
    assert ops.last_backend["affine_clipped_sum"] == "triton"
    wr, br = ref.affine_clipped_sum(x, g, c, weight=True, bias=True, scale=0.5)
    torch.testing.assert_close(w, wr, **FP64)
    torch.testing.assert_close(b, br, **FP64)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs_name_the_op_and_argument(backend):
    """The dispatcher checks the inputs before any backend (ops._validate): the same errors on both."""
    x, g, c = _case(2, 3, 4, torch.float32)
    kw = dict(weight=True, bias=True, backend=backend)
    with pytest.raises(ValueError, match="affine_norms: g must be"):
        ops.affine_norms(x, g[0], **kw)
    with pytest.raises(ValueError, match="affine_norms: xhat must be g's shape"):
        ops.affine_norms(x[:, :2], g, **kw)
    with pytest.raises(ValueError, match="affine_clipped_sum: c must"):
        ops.affine_clipped_sum(x, g, c[:1], **kw)
    with pytest.raises(ValueError, match="prev_b must have"):
        ops.affine_clipped_sum(x, g, c, prev_b=torch.zeros(5), **kw)
    with pytest.raises(TypeError, match="affine_norms: xhat must be a float16"):
        ops.affine_norms(x.int(), g, **kw)


def _op_cases():
    x, g, c = _case(2, 5, 7, torch.float32)
    pw, pb = torch.randn(7), torch.randn(7)
    d = torch.ops.dpkernels
    return [
        (d.triton_affine_norms.default, (x, g, True, True)),
        (d.triton_affine_norms.default, (x, g, False, True)),
        (d.triton_affine_clipped_sum.default, (x, g, c, True, True, 0.5, 0.25, 3, 4, pw, pb)),
        (d.triton_affine_clipped_sum.default, (x, g, c, True, False, 0.0, 1.0, 0, 0, None, None)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    x, g, c = _case(3, 5, 7, torch.float32)
    prev = torch.randn(7)

    def step(x, g, c, prev):
        nw, nb = ops.affine_norms(x, g, weight=True, bias=True, backend="triton")
        w, b = ops.affine_clipped_sum(
            x, g, c, weight=True, bias=True, noise_std=0.5, scale=0.1, seed_w=1, seed_b=2, prev_w=prev, backend="triton"
        )
        return nw + nb, w + b

    eager = step(x, g, c, prev)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, g, c, prev)
    for p, q in zip(compiled, eager):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # the same kernels on the same inputs


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("groups, loss_reduction", [("all-layer", "sum"), ("layer-wise", "mean")])
def test_make_private_step_matches_reference(groups, loss_reduction):
    """One noiseless DP-SGD step through GroupNorm (on (B, C, L): T = L positions) and RMSNorm gives the
    same gradients with the triton backend as with the reference. (LayerNorm: test_triton_embedding.py.)"""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.gn = nn.GroupNorm(2, 8)
            self.rms = nn.RMSNorm(8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):  # x: (B, L, 3)
            h = self.gn(self.inp(x).transpose(1, 2)).transpose(1, 2)
            return self.out(self.rms(h))

    def run(backend):
        torch.manual_seed(0)
        model = Model().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = dpkernels.make_private(
            model,
            opt,
            noise_multiplier=0.0,
            max_grad_norm=0.5,
            expected_batch_size=4.0,
            groups=groups,
            loss_reduction=loss_reduction,
            backend=backend,
        )
        x = torch.randn(5, 6, 3, dtype=torch.float64)
        y = torch.randn(5, 6, 2, dtype=torch.float64)
        loss = ((model(x) - y) ** 2).sum(dim=(1, 2))
        (loss.mean() if loss_reduction == "mean" else loss.sum()).backward()
        opt.step()
        served = dict(ops.last_backend)
        dpkernels.set_backend(None)
        return [p.grad.clone() for p in model.parameters()], served

    g_ref, _ = run("reference")
    g_tri, served = run("triton")
    assert served["affine_norms"] == served["affine_clipped_sum"] == "triton"
    assert all(g.abs().sum() > 0 for g in g_ref)  # a real step, not all-zero gradients
    for p, q in zip(g_tri, g_ref):
        torch.testing.assert_close(p, q, **FP64)
