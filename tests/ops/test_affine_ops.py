"""Reference affine (LayerNorm/RMSNorm/GroupNorm weight and bias) ops vs naive per-sample gradients.

The naive oracle differentiates y = xhat * w + b for one sample at a time with torch's autograd.
Tolerances for float64: sums of at most ~50 O(1) products, rounding below 1e-14 relative; rtol=1e-9
keeps a wide margin while a wrong formula (a missing position, xhat and g swapped in the bias) is O(1).
"""

from __future__ import annotations

import _naive as naive
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dpkernels.ops as ops
from dpkernels.ops import reference as ref

F64 = dict(rtol=1e-9, atol=1e-12)
DT = torch.float64


def make_case(B, T, C, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, C, generator=gen, dtype=DT), torch.randn(B, T, C, generator=gen, dtype=DT), gen


shapes = dict(
    B=st.integers(0, 4),
    T=st.integers(1, 6),
    C=st.integers(1, 7),
    weight=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=60, deadline=None)
@given(**shapes)
@example(B=0, T=2, C=3, weight=True, bias=True, seed=0)
@example(B=1, T=1, C=1, weight=True, bias=False, seed=1)
def test_affine_norms_match_naive(B, T, C, weight, bias, seed):
    xhat, g, _ = make_case(B, T, C, seed)
    gw, gb = naive.affine(xhat, g)
    nw, nb = ref.affine_norms(xhat, g, weight=weight, bias=bias)
    assert (nw is None) == (not weight) and (nb is None) == (not bias)
    if weight:
        assert nw.shape == (B,) and nw.dtype == DT
        torch.testing.assert_close(nw, gw.square().sum(1), **F64)
    if bias:
        torch.testing.assert_close(nb, gb.square().sum(1), **F64)


@settings(max_examples=60, deadline=None)
@given(**shapes, scale=st.sampled_from([1.0, 0.2]), with_prev=st.booleans())
@example(B=0, T=2, C=3, weight=True, bias=True, seed=0, scale=0.2, with_prev=True)
@example(B=1, T=1, C=1, weight=False, bias=True, seed=1, scale=1.0, with_prev=False)
def test_affine_clipped_sum_matches_naive(B, T, C, weight, bias, seed, scale, with_prev):
    xhat, g, gen = make_case(B, T, C, seed)
    c = torch.rand(B, generator=gen, dtype=DT)
    pw = torch.randn(C, generator=gen, dtype=DT) if with_prev else None
    pb = torch.randn(C, generator=gen, dtype=DT) if with_prev else None
    gw, gb = naive.affine(xhat, g)
    rw, rb = ref.affine_clipped_sum(xhat, g, c, weight=weight, bias=bias, scale=scale, prev_w=pw, prev_b=pb)
    assert (rw is None) == (not weight) and (rb is None) == (not bias)
    if weight:
        torch.testing.assert_close(rw, scale * ((pw if with_prev else 0) + (c[:, None] * gw).sum(0)), **F64)
    if bias:
        torch.testing.assert_close(rb, scale * ((pb if with_prev else 0) + (c[:, None] * gb).sum(0)), **F64)


def test_noise_per_parameter_seed():
    """Weight and bias each get scale * noise_std * gaussian(C, own seed); zero data leaves exactly that."""
    C, sigma, scale = 3000, 1.5, 0.5
    xhat = torch.zeros(2, 3, C, dtype=DT)
    g = torch.zeros(2, 3, C, dtype=DT)
    c = torch.ones(2, dtype=DT)
    rw, rb = ref.affine_clipped_sum(
        xhat, g, c, weight=True, bias=True, noise_std=sigma, scale=scale, seed_w=11, seed_b=12
    )
    torch.testing.assert_close(rw, scale * sigma * ref.gaussian((C,), 11, "cpu", DT), **F64)
    torch.testing.assert_close(rb, scale * sigma * ref.gaussian((C,), 12, "cpu", DT), **F64)
    # independent draws: over 3000 coordinates the correlation of two independent N(0,1) vectors is
    # ~ N(0, 1/3000); 0.1 is > 5 standard deviations
    assert abs(torch.corrcoef(torch.stack([rw, rb]))[0, 1].item()) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype):
    xhat, g, gen = make_case(3, 5, 4, seed=3)
    nw, nb = ref.affine_norms(xhat.to(dtype), g.to(dtype), weight=True, bias=True)
    assert nw.dtype == torch.float32 and nb.dtype == torch.float32
    # want: the same rounded inputs in float64; only fp32 accumulation over 5 positions differs
    # (~10 * 2^-24 relative); rtol=1e-5 would fail for a bf16 accumulator (2^-8)
    ww, wb = ref.affine_norms(xhat.to(dtype).double(), g.to(dtype).double(), weight=True, bias=True)
    torch.testing.assert_close(nw.double(), ww, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nb.double(), wb, rtol=1e-5, atol=1e-6)


def test_dispatch_serves_the_reference_on_cpu():
    xhat, g, _ = make_case(2, 3, 4, seed=0)
    nw, _ = ops.affine_norms(xhat, g, weight=True, bias=False)
    assert ops.last_backend["affine_norms"] == "reference"
    torch.testing.assert_close(nw, ref.affine_norms(xhat, g, weight=True, bias=False)[0], **F64)
