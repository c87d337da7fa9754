"""Reference conv ops vs naive per-sample gradients (a loop over samples, float64).

Tolerances for float64: every quantity is a sum of at most a few thousand O(1) products, so the
rounding error is below 1e3 * 2^-53 ~ 1e-13 relative; rtol=1e-9 leaves a wide margin while a wrong
formula (a missing group, a shifted patch, a wrong stride) changes results at O(1).
"""

from __future__ import annotations

import math

import _naive as naive
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpkernels.ops import reference as ref

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
F64 = dict(rtol=1e-9, atol=1e-12)


def out_size(s, k, st_, p, d):
    return (s + 2 * p - d * (k - 1) - 1) // st_ + 1


def make_case(n, B, cin_g, cout_g, groups, k, s, p, d, extra, seed):
    """Random float64 x (B, C_in, *S) and g (B, C_out, *out) for a conv with the given per-dim geometry."""
    gen = torch.Generator().manual_seed(seed)
    S = [max(1, d[i] * (k[i] - 1) + 1 - 2 * p[i]) + extra[i] for i in range(n)]
    out = [out_size(S[i], k[i], s[i], p[i], d[i]) for i in range(n)]
    assert all(o >= 1 for o in out)
    x = torch.randn(B, cin_g * groups, *S, generator=gen, dtype=torch.float64)
    g = torch.randn(B, cout_g * groups, *out, generator=gen, dtype=torch.float64)
    w = torch.randn(cout_g * groups, cin_g, *k, generator=gen, dtype=torch.float64)
    return x, g, w


def check_case(x, g, w, stride, padding, dilation, groups, bias=True, seed=0):
    kernel_size = tuple(w.shape[2:])
    gw, gb = naive.conv(x, g, tuple(w.shape), stride, padding, dilation, groups, bias)
    geom = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    for method in ("ghost", "inst"):
        nw, nb = ref.conv_norms(x, g, kernel_size=kernel_size, bias=bias, method=method, **geom)
        assert nw.dtype == torch.float64 and nw.shape == (x.shape[0],)
        torch.testing.assert_close(nw, gw.flatten(1).square().sum(1), **F64)
        if bias:
            torch.testing.assert_close(nb, gb.square().sum(1), **F64)
        else:
            assert nb is None

    gen = torch.Generator().manual_seed(seed)
    B = x.shape[0]
    c = torch.rand(B, generator=gen, dtype=torch.float64)
    prev_w = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    prev_b = torch.randn(w.shape[0], generator=gen, dtype=torch.float64)
    noise_std, scale = 0.7, 0.25
    rw, rb = ref.conv_clipped_sum(
        x, g, c, weight_shape=w.shape, bias=bias, noise_std=noise_std, scale=scale,
        seed_w=11, seed_b=12, prev_w=prev_w, prev_b=prev_b, **geom,
    )  # fmt: skip
    cw = c.view(-1, *[1] * w.dim())
    zw = ref.gaussian(w.shape, 11, "cpu", torch.float64)
    torch.testing.assert_close(rw, scale * (prev_w + (gw * cw).sum(0) + noise_std * zw), **F64)
    if bias:
        zb = ref.gaussian((w.shape[0],), 12, "cpu", torch.float64)
        torch.testing.assert_close(rb, scale * (prev_b + (gb * c[:, None]).sum(0) + noise_std * zb), **F64)
    else:
        assert rb is None


@st.composite
def geometries(draw):
    n = draw(st.sampled_from([1, 2, 3]))
    small = n == 3  # keep 3-d cases tiny
    dims = st.integers(1, 2 if small else 3)
    k = [draw(dims) for _ in range(n)]
    s = [draw(st.integers(1, 2 if small else 3)) for _ in range(n)]
    p = [draw(st.integers(0, 2)) for _ in range(n)]
    d = [draw(st.integers(1, 2)) for _ in range(n)]
    extra = [draw(st.integers(0, 2 if small else 4)) for _ in range(n)]
    groups = draw(st.sampled_from([1, 2, 3]))
    cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    B = draw(st.integers(0, 3))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return n, B, cin_g, cout_g, groups, k, s, p, d, extra, bias, seed


@settings(max_examples=60, deadline=None)
@given(geometries())
def test_conv_ops_match_naive_random_geometry(case):
    n, B, cin_g, cout_g, groups, k, s, p, d, extra, bias, seed = case
    x, g, w = make_case(n, B, cin_g, cout_g, groups, k, s, p, d, extra, seed)
    check_case(x, g, w, tuple(s), tuple(p), tuple(d), groups, bias=bias, seed=seed)


# Edge cases, on every dimension: B = 0, B = 1, T = 1 (one output position), 1x1 kernels,
# odd sizes, groups = C_in (depthwise), stride larger than the kernel.
EDGE = {
    "B0": dict(B=0, cin_g=2, cout_g=3, groups=1, k=3, s=1, p=1, d=1, extra=2),
    "B1": dict(B=1, cin_g=3, cout_g=2, groups=1, k=3, s=2, p=0, d=1, extra=3),
    "T1": dict(B=3, cin_g=2, cout_g=5, groups=1, k=3, s=1, p=0, d=1, extra=0),
    "1x1": dict(B=3, cin_g=5, cout_g=3, groups=1, k=1, s=1, p=0, d=1, extra=4),
    "1x1-strided": dict(B=2, cin_g=3, cout_g=3, groups=1, k=1, s=2, p=0, d=1, extra=4),
    "depthwise": dict(B=3, cin_g=1, cout_g=2, groups=3, k=3, s=1, p=1, d=2, extra=1),
    "stride>k": dict(B=2, cin_g=2, cout_g=2, groups=2, k=2, s=3, p=1, d=1, extra=5),
}


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("name", list(EDGE))
@pytest.mark.parametrize("bias", [True, False])
def test_conv_ops_edge_cases(n, name, bias):
    e = EDGE[name]
    per = lambda v: [v] * n
    x, g, w = make_case(
        n, e["B"], e["cin_g"], e["cout_g"], e["groups"], per(e["k"]), per(e["s"]), per(e["p"]), per(e["d"]),
        per(e["extra"]), seed=n,
    )  # fmt: skip
    if name == "T1":
        assert math.prod(g.shape[2:]) == 1
    check_case(x, g, w, tuple(per(e["s"])), tuple(per(e["p"])), tuple(per(e["d"])), e["groups"], bias=bias)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), ((1, 3), (2, 0), (2, 1))])
def test_conv_unfold_2d_matches_F_unfold(stride, padding, dilation):
    # Exact: both only copy input elements (and zeros) into place.
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    k = (3, 2)
    a = ref.conv_unfold(x, k, stride, padding, dilation)
    expect = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    torch.testing.assert_close(a, expect, rtol=0, atol=0)


def test_conv_norms_bf16_within_rounding_bound():
    """bf16 inputs: norms accumulate in fp32 and differ from the exact (float64, unrounded) norms by at most
    the effect of rounding x and g to bf16 plus fp32 accumulation error.

    Rounding: x^ = x (1 + e1), g^ = g (1 + e2), |e| <= u = 2^-8 (bf16 keeps 8 significant bits), so each
    gradient entry moves by at most (2u + u^2) sum_t |g_t| |a_t| and, by the triangle inequality, the norm
    by (2u + u^2) ||M||_F with M = |G|^T |A| (the per-sample gradient of the conv of |x| against |g|).
    fp32 accumulation of the squared norm (n = T^2 + d + p terms for ghost, T + p d for inst): absolute error
    <= n u32 ||M||_F^2 (every term is bounded by the matching term of ||M||^2), i.e. on the norm
    n u32 ||M||^2 / ||E||.
    """
    torch.manual_seed(0)
    x = torch.randn(4, 6, 7, 8, dtype=torch.float64)
    g = torch.randn(4, 4, 4, 4, dtype=torch.float64)  # conv 3x3, stride 2, padding 1, dilation 1, groups 2
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    geom = dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=2)
    gw, _ = naive.conv(x, g, tuple(w.shape), bias=False, **geom)
    exact = gw.flatten(1).norm(dim=1)
    gm, _ = naive.conv(x.abs(), g.abs(), tuple(w.shape), bias=False, **geom)
    m = gm.flatten(1).norm(dim=1)
    u, u32 = 2.0**-8, 2.0**-24
    T, d, p = 16, 27, 2
    for method in ("ghost", "inst"):
        nw, _ = ref.conv_norms(x.bfloat16(), g.bfloat16(), kernel_size=(3, 3), bias=False, method=method, **geom)
        assert nw.dtype == torch.float32
        n_terms = T * T + d + p if method == "ghost" else T + p * d
        bound = (2 * u + u * u) * m + n_terms * u32 * m.square() / exact
        err = (nw.double().sqrt() - exact).abs()
        assert bool((err <= bound).all()), (method, err, bound)
        # The bound is not vacuous: it is a small fraction of the norm.
        assert bool((bound < 0.1 * exact).all())


def test_conv_norms_bad_method():
    x, g = torch.randn(1, 1, 4), torch.randn(1, 1, 2)
    with pytest.raises(ValueError, match="method"):
        ref.conv_norms(x, g, kernel_size=3, stride=1, padding=0, dilation=1, groups=1, bias=False, method="x")


def test_conv_norms_shape_mismatch_is_an_error():
    x, g = torch.randn(2, 2, 6), torch.randn(2, 2, 5)  # kernel 3 gives 4 outputs, not 5
    with pytest.raises(ValueError, match="output positions"):
        ref.conv_norms(x, g, kernel_size=3, stride=1, padding=0, dilation=1, groups=1, bias=False, method="ghost")
