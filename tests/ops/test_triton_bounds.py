"""The Triton kernels' certified bounds (dpkernels/ops/triton/linear_norms.py, affine.py): upper bounds on
the exact squared norms of the stored tensors, value + err and cap each on its own (the cap could hide a
wrong err), on natural data close to the exact norm, and served by dpkernels.ops.certified for the
Triton backend in place of the generic certificate. Under TRITON_INTERPRET=1: small shapes, crossing the
kernels' tiles (T = 70: two Gram tiles, an off-diagonal pair; p = 130: two output tiles)."""

from __future__ import annotations

import pytest
import torch
from _device import DEVICE

from dpkernels import ops
from dpkernels.ops import certified

tt = pytest.importorskip("dpkernels.ops.triton")

SHAPES = [(2, 70, 20, 33), (3, 5, 7, 9), (1, 33, 130, 5), (3, 1, 17, 130)]  # (B, T, d, p); T = 1: token norms
HALF = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _exact(a, g):
    w = torch.stack([(gi.double().T @ ai.double()).square().sum() for ai, gi in zip(a, g, strict=True)])
    return w, g.double().sum(1).square().sum(1)


def _rows(B, T, d, p, dtype, seed=0, scale_a=1.0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d, generator=gen, dtype=torch.float64) * scale_a
    g = torch.randn(B, T, p, generator=gen, dtype=torch.float64)
    return a.to(DEVICE, dtype), g.to(DEVICE, dtype)


def _holds(b, exact, what):
    """value + err and the cap are each upper bounds; certified() too."""
    up = (b.value + b.err).cpu()
    assert bool((up >= exact).all()), f"{what}: value + err {up.tolist()} < exact {exact.tolist()}"
    assert bool((b.cap.cpu() >= exact).all()), f"{what}: cap {b.cap.tolist()} < exact {exact.tolist()}"
    assert bool((b.certified().cpu() >= exact).all()), what


@pytest.mark.parametrize("method", ["ghost", "inst"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_natural_data_tight(shape, dtype, method):
    a, g = _rows(*shape, dtype)
    ew, eb = _exact(a.cpu(), g.cpu())
    w, b = tt.linear_norms_bound(a, g, bias=True, method=method)
    _holds(w, ew, f"weight {method}")
    _holds(b, eb, "bias")
    # the bounds' relative terms are gamma_{d+1}(2^-23)-sized times the weights of the error sums (a few
    # times the norm here): measured <= 2.1e-4 at these shapes; 1e-3 as for the reference's bounds.
    assert (w.certified().cpu() / ew - 1).max().item() <= 1e-3
    # the bias is summed in float64: gamma_T(2^-53)-sized
    assert (b.certified().cpu() / eb - 1).max().item() <= 1e-10


@pytest.mark.parametrize("method", ["ghost", "inst"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["cancel", "huge", "max", "tiny", "mixed"])
def test_adversarial_data(kind, dtype, method):
    """cancel: token pairs (a, a + delta) with gradients (w, -w), so the float32 ghost value cancels;
    huge / tiny: magnitudes whose float32 Grams overflow / underflow unscaled; max: near float32's
    largest value (token norms past 2^124: the cap serves); mixed: one sample huge, one tiny."""
    B, T, d, p = 2, 70, 6, 5
    a, g = _rows(B, T, d, p, torch.float64, seed=1)
    if kind == "cancel":
        a[:, 1::2] = a[:, 0::2] + 1e-6 * a[:, 1::2]
        a, g = a * 1e3, g.clone()
        g[:, 1::2] = -g[:, 0::2]
    elif kind in ("huge", "tiny", "max"):
        a = a * {"huge": 1e30, "tiny": 1e-35, "max": 1e37}[kind]
    else:
        a[0] *= 1e30
        a[1] *= 1e-30
    a, g = a.to(dtype), g.to(dtype)
    ew, eb = _exact(a, g)
    w, b = tt.linear_norms_bound(a, g, bias=True, method=method)
    _holds(w, ew, f"weight {method} {kind}")
    _holds(b, eb, f"bias {kind}")
    assert bool(torch.isfinite(w.certified()).all())
    if kind in ("huge", "tiny", "mixed"):  # scaled per tile / sample: still tight
        assert (w.certified() / ew - 1).max().item() <= 1e-3


def test_float16_unscaled_and_float64_by_the_reference():
    a, g = _rows(2, 40, 9, 7, torch.float16, seed=2)
    a = a * 3e3  # large float16 values: their float32 Grams neither overflow nor underflow
    ew, eb = _exact(a, g)
    for method in ("ghost", "inst"):
        w, b = tt.linear_norms_bound(a, g, bias=True, method=method)
        _holds(w, ew, method)
        assert (w.certified() / ew - 1).max().item() <= 1e-3
    a64, g64 = a.double() * 1e200, g.double()
    w, _ = tt.linear_norms_bound(a64, g64, bias=False, method="ghost")
    wr, _ = ops.reference.linear_norms_bound(a64, g64, bias=False, method="ghost")
    assert torch.equal(w.certified(), wr.certified())


def test_non_finite_input_gives_non_finite_norm():
    a, g = _rows(2, 20, 6, 5, torch.float32, seed=3)
    a[1, 3, 2] = float("inf")
    g[0, 5, 1] = float("nan")
    for method in ("ghost", "inst"):
        w, b = tt.linear_norms_bound(a, g, bias=True, method=method)
        assert not bool(torch.isfinite(w.certified()).any()), method
        assert not bool(torch.isfinite(b.certified()[0]))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_affine_bounds(dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 21, 130, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 21, 130, generator=gen, dtype=torch.float64)
    g[:, -1] = -g[:, :-1].sum(1) + 1e-4 * g[:, -1]  # the bias gradient cancels
    x, g = x.to(DEVICE, dtype), g.to(DEVICE, dtype)
    ew = (x.double() * g.double()).sum(1).square().sum(1).cpu()
    eb = g.double().sum(1).square().sum(1).cpu()
    w, b = tt.affine_norms_bound(x, g, weight=True, bias=True)
    _holds(w, ew, "affine weight")
    _holds(b, eb, "affine bias")
    assert (w.certified().cpu() / ew - 1).max().item() <= 1e-10  # float64 sums: gamma_T(2^-53)-sized
    assert tt.affine_norms_bound(x, g, weight=False, bias=True)[0] is None


def test_certified_serves_the_kernels_bounds(monkeypatch):
    """dpkernels.ops.certified finds the Triton backend's own bounds (not the generic certificate)."""
    a, g = _rows(2, 10, 6, 5, torch.float32)
    own, _ = certified._own("linear_norms", "triton", a, g, bias=True, method="ghost")
    assert own is tt.linear_norms_bound
    assert certified._own("bias_norms", "triton", g)[0] is tt.bias_norms_bound
    assert certified._own("affine_norms", "triton", a, a, weight=True, bias=True)[0] is tt.affine_norms_bound
    monkeypatch.setattr(certified, "generic_bound", lambda *a, **k: pytest.fail("generic certificate used"))
    w, b = certified.linear_norms(a, g, bias=True, method="inst", backend="triton")
    ew, eb = _exact(a, g)
    assert bool((w >= ew).all()) and bool((b >= eb).all())


@pytest.mark.parametrize("name", ["linear_norms_ghost_bound", "linear_norms_inst_bound", "sum_bound", "token_norms"])
def test_opcheck(name):
    """The bound ops are torch.library custom ops with fake impls (torch.compile traces through them)."""
    a, g = _rows(2, 5, 7, 9, torch.float32)
    args = (g, g, True) if name == "sum_bound" else (a, g)
    torch.library.opcheck(getattr(torch.ops.dpkernels, f"triton_{name}").default, args)


def test_launches():
    """ghost: the token-norm pre-pass and the bound's tiles; the bias: one float64 column-sum kernel."""
    from dpkernels.ops.triton._common import observe_launches
    from dpkernels.ops.triton.linear_norms import ghost_bound_config

    a, g = _rows(2, 70, 6, 5, torch.float32)
    with observe_launches() as seen:
        tt.linear_norms_bound(a, g, bias=True, method="ghost")
    assert [x.kernel.__name__ for x in seen] == ["_token_norms_kernel", "_ghost_bound_kernel", "_sum_bound_kernel"]
    n = -(-70 // ghost_bound_config(70, 6, 5, torch.float32)["BLOCK_T"])  # T-tiles
    assert n >= 2 and seen[1].grid == (2 * n * (n + 1) // 2,)  # one program per pair I <= J
