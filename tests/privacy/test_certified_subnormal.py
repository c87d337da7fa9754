"""Certified norms of samples whose stored 16-bit entries are subnormal (bfloat16 1e-40: float32's
exponent range, so a DP adversary can store such samples): the certified norm must stay >= the exact one."""

from __future__ import annotations

import importlib

import pytest
import torch

from dpkernels import ops


def _subnormal(shape, gen):
    """bfloat16 entries of either sign in [0.5e-40, 1.5e-40]: all subnormal, none 0."""
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5) * 1e-40
    return torch.where(torch.rand(shape, generator=gen) < 0.5, -x, x).to(torch.bfloat16)


@pytest.mark.parametrize("method", ["ghost", "inst"])
def test_triton_bounds_bfloat16_subnormal(method):
    try:
        tri = importlib.import_module("dpkernels.ops.triton")
    except Exception as exc:  # triton not installed here
        pytest.skip(f"no Triton backend: {exc}")
    if not hasattr(tri, "linear_norms_bound"):
        pytest.skip("the Triton backend has no bounds of its own (the generic certificate serves it)")
    gen = torch.Generator().manual_seed(0)
    a = _subnormal((3, 4, 5), gen)
    g = _subnormal((3, 4, 6), gen)
    assert bool((a != 0).all()) and bool((g != 0).all())  # subnormal, not flushed, in storage
    w, b = ops.certified.linear_norms(a, g, bias=True, method=method, backend="triton")
    a64, g64 = a.double(), g.double()
    ew = torch.einsum("btp,btd->bpd", g64, a64).square().sum((1, 2))
    eb = g64.sum(1).square().sum(1)
    assert bool((w >= ew).all()), f"weight: certified {w.tolist()} < exact {ew.tolist()}"
    assert bool((b >= eb).all()), f"bias: certified {b.tolist()} < exact {eb.tolist()}"


def test_triton_affine_bounds_bfloat16_subnormal():
    """The norm layers' affine bounds (float64 column sums of x_t * g_t) from the same subnormal entries."""
    try:
        importlib.import_module("dpkernels.ops.triton")
    except Exception as exc:  # triton not installed here
        pytest.skip(f"no Triton backend: {exc}")
    gen = torch.Generator().manual_seed(1)
    x, g = _subnormal((3, 4, 6), gen), _subnormal((3, 4, 6), gen)
    w, b = ops.certified.affine_norms(x, g, weight=True, bias=True, backend="triton")
    x64, g64 = x.double(), g.double()
    ew = (x64 * g64).sum(1).square().sum(1)
    eb = g64.sum(1).square().sum(1)
    assert bool((eb > 0).all())
    assert bool((w >= ew).all()), f"weight: certified {w.tolist()} < exact {ew.tolist()}"
    assert bool((b >= eb).all()), f"bias: certified {b.tolist()} < exact {eb.tolist()}"
