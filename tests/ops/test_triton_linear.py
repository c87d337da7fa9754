"""Triton Linear/bias ops vs naive per-sample gradients and the reference, under TRITON_INTERPRET=1.

Shapes cross the kernels' block sizes (T = 70 > 64 gives two Gram tiles, so the
off-diagonal pair weighted 2x; p = 130 > 128 two output tiles) and include B = 0, B = 1,
T = 1 and odd sizes. Noise is tested in test_triton_noise.py; here noise_std = 0.
"""

from __future__ import annotations

import _naive as naive
import pytest
import torch
import torch.nn as nn
from _device import DEVICE

import dpkernels
from dpkernels import ops
from dpkernels.ops import reference as ref

tt = pytest.importorskip("dpkernels.ops.triton")
from dpkernels.ops.triton.linear_clipped_sum import launch_clipped_sum  # noqa: E402

# (B, T, d, p)
SHAPES = [(0, 3, 4, 5), (1, 1, 3, 4), (3, 5, 7, 9), (2, 70, 20, 33), (2, 1, 17, 130), (1, 33, 130, 5)]
METHODS = ["ghost", "inst"]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    # The fp32 tolerances below assume IEEE fp32 dots (tl.dot input_precision "ieee"), which the
    # kernels use while torch's matmul precision is "highest" (the default); see _common.dot_precision.
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _inputs(B, T, d, p, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE, dtype)
    g = torch.randn(B, T, p, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE, dtype)
    c = torch.rand(B, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE, dtype)
    return a, g, c


def _snr_db(x, ref_x):
    """Signal-to-noise ratio of x against ref_x in dB (inf when equal)."""
    err = (x.double() - ref_x.double()).square().sum()
    return (10 * torch.log10(ref_x.double().square().sum() / err)).item() if err > 0 else float("inf")


# fp64: the worst-case rounding bound of a float64 sum of n terms is n * 1.1e-16 relative to the
# sum of |terms|; the largest sums here have n <= T^2 + max(d, p) ~ 5000 terms, so ~6e-13: rtol 1e-10
# leaves a 100x margin, and any indexing or masking error changes results at O(1).
FP64 = dict(rtol=1e-10, atol=1e-10)
# fp32 against float64 truth: the same bound with eps = 6e-8 is ~3e-4 worst case but ~sqrt(n) eps ~ 4e-6
# for the random data here (rounding errors are independent); rtol 1e-4 keeps a 25x margin over that.
# atol covers norms of ~0 only (B = 0 gives empty tensors).
FP32 = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_norms_fp64_match_naive(shape, method):
    a, g, _ = _inputs(*shape, torch.float64)
    gw, gb = naive.linear(a, g)
    w, b = tt.linear_norms(a, g, bias=True, method=method)
    assert w.dtype == b.dtype == torch.float64 and w.shape == b.shape == (shape[0],)
    torch.testing.assert_close(w, gw.flatten(1).square().sum(1), **FP64)
    torch.testing.assert_close(b, gb.square().sum(1), **FP64)
    w2, b2 = tt.linear_norms(a, g, bias=False, method=method)
    assert b2 is None
    torch.testing.assert_close(w2, w, rtol=0, atol=0)  # the bias flag only adds an output


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES[2:4])  # the edge cases are covered in float64 above
def test_norms_fp32(shape, method):
    a, g, _ = _inputs(*shape, torch.float32)
    gw, gb = naive.linear(a, g)  # float64 truth on the same (fp32-representable) inputs
    w, b = tt.linear_norms(a, g, bias=True, method=method)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), gw.flatten(1).square().sum(1), **FP32)
    torch.testing.assert_close(b.double(), gb.square().sum(1), **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_norms_half(dtype, method):
    # A product of two 16-bit floats is exact in fp32, so with fp32 accumulation the norms of half
    # inputs are as accurate as fp32 ones against the float64 truth on the same rounded inputs: the
    # worst-case fp32 summation bound n * eps with n ~ 5000 terms is 3e-4 relative, i.e. 70 dB
    # (measured: > 100 dB). A dropped or double-counted tile gives < 20 dB.
    a, g, _ = _inputs(2, 70, 20, 33, dtype)
    gw, gb = naive.linear(a, g)
    w, b = tt.linear_norms(a, g, bias=True, method=method)
    assert w.dtype == torch.float32  # half inputs accumulate and return in fp32, as the reference
    assert _snr_db(w, gw.flatten(1).square().sum(1)) > 70
    assert _snr_db(b, gb.square().sum(1)) > 70


@pytest.mark.parametrize("shape", SHAPES)
def test_bias_norms(shape):
    _, g, _ = _inputs(*shape, torch.float64)
    _, gb = naive.linear(torch.zeros(*shape[:2], 1, dtype=torch.float64), g)
    torch.testing.assert_close(tt.bias_norms(g), gb.square().sum(1), **FP64)
    torch.testing.assert_close(tt.bias_norms(g.float()).double(), gb.square().sum(1), **FP32)


@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_clipped_sum_fp64_matches_naive(shape, splits):
    """scale * (prev + sum_i c_i G_i^T A_i): the fused epilogue (splits 1) and the split-K
    workspace + finish kernel (splits 3) give the same result."""
    B, T, d, p = shape
    a, g, c = _inputs(*shape, torch.float64)
    gw, gb = naive.linear(a, g)
    prev_w = torch.randn(p, d, dtype=torch.float64)
    prev_b = torch.randn(p, dtype=torch.float64)
    exp_w = 0.25 * (prev_w + (c[:, None, None] * gw).sum(0))
    exp_b = 0.25 * (prev_b + (c[:, None] * gb).sum(0))
    kw = dict(noise_std=0.0, scale=0.25, seed_w=1, seed_b=2, prev_w=prev_w, prev_b=prev_b)
    if splits is None:
        w, b = tt.linear_clipped_sum(a, g, c, bias=True, **kw)
    else:
        w, b = launch_clipped_sum(a, g, c, bias=True, splits=splits, **kw)
    torch.testing.assert_close(w, exp_w, **FP64)
    torch.testing.assert_close(b, exp_b, **FP64)
    w2, b2 = tt.linear_clipped_sum(a, g, c, bias=False)
    assert b2 is None
    torch.testing.assert_close(w2, (c[:, None, None] * gw).sum(0), **FP64)
    torch.testing.assert_close(tt.bias_clipped_sum(g, c, scale=0.25, prev=prev_b), exp_b, **FP64)


@pytest.mark.parametrize("shape", SHAPES[3:5])
def test_clipped_sum_fp32(shape):
    B, T, d, p = shape
    a, g, c = _inputs(*shape, torch.float32)
    gw, gb = naive.linear(a, g)
    w, b = tt.linear_clipped_sum(a, g, c, bias=True)
    assert w.dtype == b.dtype == torch.float32
    # entries are sums of B*T <= 140 products: well inside the FP32 tolerance's reasoning above
    torch.testing.assert_close(w.double(), (c.double()[:, None, None] * gw).sum(0), **FP32)
    torch.testing.assert_close(b.double(), (c.double()[:, None] * gb).sum(0), **FP32)


@pytest.mark.parametrize("dtype, min_db", [(torch.bfloat16, 40), (torch.float16, 55)])
def test_clipped_sum_half(dtype, min_db):
    # The kernel rounds c_i g_it to the input dtype once (tensor cores multiply 16-bit operands):
    # relative error <= 2^-9 (bf16) / 2^-12 (fp16) per term, uniform, so SNR ~ 59 dB / ~77 dB;
    # the bars keep ~20 dB of margin and still fail a dropped tile or a missing clip factor
    # (<< 40 dB). The bias is summed in fp32 before any rounding.
    a, g, c = _inputs(3, 70, 20, 130, dtype)
    gw, gb = naive.linear(a, g)
    w, b = tt.linear_clipped_sum(a, g, c, bias=True)
    assert w.dtype == torch.float32
    assert _snr_db(w, (c.double()[:, None, None] * gw).sum(0)) > min_db
    assert _snr_db(b, (c.double()[:, None] * gb).sum(0)) > 90  # fp32 sums of 210 exact products: <= 1.3e-5, 98 dB


@pytest.mark.parametrize("c_scale", [3000.0, 1e-8])
@pytest.mark.parametrize("splits", [1, 3])
def test_clipped_sum_fp16_products_stay_in_range(c_scale, splits):
    """fp16 rows whose products c_i g_it leave fp16's range: c up to 3000 (automatic clipping's
    R / (n + gamma) exceeds 1) on |g| up to ~70 gives products past 65504, once rounded to inf (NaN
    weights); c up to 1e-8 gives products below fp16's smallest subnormal (6e-8), once flushed to 0.
    The kernel scales each tile of c_i g_it by a power of two into fp16's range and undoes it in fp32,
    so the result is as accurate as for c in [0, 1]: the bar of test_clipped_sum_half."""
    a, g, c = _inputs(3, 70, 20, 130, torch.float16)
    g, c = g * 16, c.float() * c_scale
    gw, _ = naive.linear(a, g)
    expected = (c.double()[:, None, None] * gw).sum(0)
    w, _ = launch_clipped_sum(a, g, c, False, 0.0, 1.0, 0, 0, None, None, splits=splits)
    assert torch.isfinite(w).all()
    assert _snr_db(w, expected) > 55


def test_matches_reference_backend():
    """The dispatcher serves the triton backend when forced, with the reference's results."""
    a, g, c = _inputs(2, 9, 5, 6, torch.float64)
    for method in METHODS:
        w, b = ops.linear_norms(a, g, bias=True, method=method, backend="triton")
        assert ops.last_backend["linear_norms"] == "triton"
        wr, br = ref.linear_norms(a, g, bias=True, method=method)
        torch.testing.assert_close(w, wr, **FP64)
        torch.testing.assert_close(b, br, **FP64)
    dpkernels.set_backend("triton")
    w, b = ops.linear_clipped_sum(a, g, c, bias=True, scale=0.5)
    assert ops.last_backend["linear_clipped_sum"] == "triton"
    wr, br = ref.linear_clipped_sum(a, g, c, bias=True, scale=0.5)
    torch.testing.assert_close(w, wr, **FP64)
    torch.testing.assert_close(b, br, **FP64)
    torch.testing.assert_close(ops.bias_norms(g), ref.bias_norms(g), **FP64)
    torch.testing.assert_close(ops.bias_clipped_sum(g, c), ref.bias_clipped_sum(g, c), **FP64)


def test_mixed_and_strided_inputs():
    """a and g of different dtypes are promoted; non-contiguous inputs are read through their strides."""
    a, g, c = _inputs(2, 9, 5, 6, torch.float64)
    at = a.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (45, 1, 9)
    gw, gb = naive.linear(a, g)
    for method in METHODS:
        w, _ = tt.linear_norms(at, g, bias=False, method=method)
        torch.testing.assert_close(w, gw.flatten(1).square().sum(1), **FP64)
    w, _ = tt.linear_clipped_sum(at, g, c, bias=False)
    torch.testing.assert_close(w, (c[:, None, None] * gw).sum(0), **FP64)
    w, _ = tt.linear_norms(a.float(), g.to(torch.bfloat16), bias=False, method="ghost")
    assert w.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs_name_the_op_and_argument(backend):
    """The dispatcher checks the inputs before any backend (ops._validate): the same errors on both."""
    a, g, c = _inputs(2, 3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="linear_norms: method"):
        ops.linear_norms(a, g, bias=True, method="fast", backend=backend)
    with pytest.raises(ValueError, match="linear_norms: a must be"):
        ops.linear_norms(a[:1], g, bias=True, method="ghost", backend=backend)
    with pytest.raises(ValueError, match="linear_clipped_sum: c must"):
        ops.linear_clipped_sum(a, g, c[:1], bias=True, backend=backend)
    with pytest.raises(ValueError, match="prev_w must have"):
        ops.linear_clipped_sum(a, g, c, bias=True, prev_w=torch.zeros(4, 5), backend=backend)
    with pytest.raises(TypeError, match="bias_norms: g must be a float16, bfloat16, float32 or float64 tensor"):
        ops.bias_norms(g.to(torch.int32), backend=backend)
    long = torch.zeros(1, 64 * 23170, 1)  # more Gram tiles than the ghost kernel's int32 pair index allows
    with pytest.raises(ValueError, match="use method='inst'"):
        tt.linear_norms(long, long, bias=False, method="ghost")


# ----------------------------------------------------------------------------- torch.library


def _op_cases():
    a, g, c = _inputs(2, 5, 7, 9, torch.float32)
    pw, pb = torch.randn(9, 7), torch.randn(9)
    d = torch.ops.dpkernels
    return [
        (d.triton_linear_norms_ghost.default, (a, g, True)),
        (d.triton_linear_norms_inst.default, (a, g, True)),
        (d.triton_bias_norms.default, (g,)),
        (d.triton_linear_clipped_sum.default, (a, g, c, True, 0.5, 0.25, 3, 4, pw, pb)),
        (d.triton_bias_clipped_sum.default, (g, c, 0.5, 0.25, 5, pb)),
        (d.triton_add_noise.default, (None, [3, 4], 1.0, 1.0, 7, DEVICE, torch.float64)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


# aot_eager runs dynamo, the fake impls and AOT autograd's functionalization, which is what the ops
# must support; inductor adds C++ codegen of the surrounding ops on the CPU (~30 s): slow.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    """A function calling every op through the dispatcher compiles without graph breaks and
    gives the eager results (noise included: it is a function of the seed)."""
    a, g, c = _inputs(3, 5, 7, 9, torch.float32)
    prev = torch.randn(9, 7)

    def step(a, g, c, prev):
        nw, nb = ops.linear_norms(a, g, bias=True, method="ghost", backend="triton")
        ni, _ = ops.linear_norms(a, g, bias=False, method="inst", backend="triton")
        w, b = ops.linear_clipped_sum(
            a, g, c, bias=True, noise_std=0.5, scale=0.1, seed_w=11, seed_b=12, prev_w=prev, backend="triton"
        )
        bn = ops.bias_norms(g, backend="triton")
        bs = ops.bias_clipped_sum(g, c, noise_std=0.5, seed=13, backend="triton")
        z = ops.add_noise(None, (4, 2), noise_std=1.0, scale=1.0, seed=14, device=a.device, backend="triton")
        return nw + nb + ni + bn, w, b + bs, z

    eager = step(a, g, c, prev)
    compiled = torch.compile(step, fullgraph=True, backend=backend)(a, g, c, prev)
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # the same kernels on the same inputs


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("groups, loss_reduction", [("all-layer", "mean"), ("layer-wise", "sum")])
def test_make_private_step_matches_reference(groups, loss_reduction):
    """One noiseless DP-SGD step of a small MLP (a Linear on (B, T, d) inputs, so both the ghost
    and the instantiation rule fire) gives the same gradients with either backend."""

    def run(backend):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 24), nn.Tanh(), nn.Linear(24, 3)).double()
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
        x = torch.randn(6, 4, 5, dtype=torch.float64)
        y = torch.randn(6, 4, 3, dtype=torch.float64)
        loss = ((model(x) - y) ** 2).sum(dim=(1, 2))
        (loss.mean() if loss_reduction == "mean" else loss.sum()).backward()
        opt.step()
        served = dict(ops.last_backend)
        dpkernels.set_backend(None)
        return [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()], served

    g_ref, p_ref, _ = run("reference")
    g_tri, p_tri, served = run("triton")
    assert served["linear_norms"] == served["linear_clipped_sum"] == "triton"
    assert all(g.abs().sum() > 0 for g in g_ref)  # a real step, not all-zero gradients
    for x, y in zip(g_tri + p_tri, g_ref + p_ref):
        torch.testing.assert_close(x, y, **FP64)
