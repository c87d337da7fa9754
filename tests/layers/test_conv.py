"""DPConv1d/2d/3d through make_private (noise_multiplier=0) vs naively clipped per-sample gradients.

The naive oracle (tests/oracle.py): autograd of each sample's loss on the unconverted model in float64,
per-sample total norm over all trainable parameters (all-layer clipping), c_i = min(1, R / (n_i + 1e-6)),
expected gradient sum_i c_i grad_i (divided by the expected batch size for loss_reduction="mean").

Tolerance (float64): the DP path and the oracle compute the same sums in a different order, each of at
most a few thousand O(1) terms: differences ~1e-13 relative; rtol=1e-9 is far above that and far below the
O(1e-2) change a wrong norm or a missed sample makes.
"""

from __future__ import annotations

import copy

import oracle
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpkernels
from dpkernels.functional.conv import ConvFunction
from dpkernels.nn import DPConv1d, DPConv2d, DPConv3d

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
DPCONV = {1: DPConv1d, 2: DPConv2d, 3: DPConv3d}
F64 = dict(rtol=1e-9, atol=1e-12)
EBS = 3.5  # expected batch size, deliberately not the realised one


def naive_per_sample(model, x, y):
    """Per-sample gradients of loss_i = sum((model(x_i) - y_i)^2), as {name: (B, *shape)} (tests/oracle.py)."""
    return oracle.per_sample_grads(model, lambda m, s: ((m(s[0]) - s[1]) ** 2).sum(), (x.detach(), y))


def expected_step(ps, R, reduction):
    """sum_i c_i grad_i (/ EBS for "mean") with c_i = min(1, R / (n_i + 1e-6)), n_i over all parameters."""
    n = sum(v.flatten(1).square().sum(1) for v in ps.values()).sqrt()
    c = (R / (n + 1e-6)).clamp(max=1.0)
    div = EBS if reduction == "mean" else 1.0
    return {k: (v * c.view(-1, *[1] * (v.dim() - 1))).sum(0) / div for k, v in ps.items()}, n


def dp_step(model, x, y, reduction, R=None, strategy="bk"):
    """One DP step's gradients; R defaults to the median naive norm, so some samples clip and some do not."""
    ref_model = copy.deepcopy(model)
    ps = naive_per_sample(ref_model, x, y)
    if R is None:
        n = sum(v.flatten(1).square().sum(1) for v in ps.values()).sqrt()
        R = float(n.median()) if n.numel() else 1.0
    expect, _ = expected_step(ps, R, reduction)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=EBS,
        loss_reduction=reduction, strategy=strategy,
    )  # fmt: skip
    per = ((model(x) - y) ** 2).flatten(1).sum(1)
    loss = per.mean() if reduction == "mean" else per.sum()
    opt.backward(loss)
    opt.step()  # a parameter no sample reached (B = 0) gets its (zero) noise here
    got = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    return got, expect, model, opt


def assert_grads(got, expect):
    assert set(got) == set(expect)
    for k in expect:
        assert got[k] is not None, k
        torch.testing.assert_close(got[k], expect[k], **F64, msg=lambda m, k=k: f"{k}: {m}")


def geometry(n, case):
    """Constructor kwargs and an input spatial size for a named geometry case in n dims."""
    rep = lambda v: v if n == 1 else (v,) * n
    cases = {
        "pad1-stride2": (dict(kernel_size=rep(3), padding=rep(1), stride=rep(2)), 7),
        # even kernel, odd total padding: the asymmetric "same" case (one extra zero on the right)
        "same-even-k": (dict(kernel_size=rep(4), padding="same", groups=2), 6),
        # even kernel and dilation 3: total padding 3 * 1 = 3, asymmetric again
        "same-dilated": (dict(kernel_size=rep(2), padding="same", dilation=rep(3)), 7),
        "valid-dilated": (dict(kernel_size=rep(2), padding="valid", dilation=rep(2)), 6),
        "tuple-pad": (
            dict(kernel_size=tuple(range(2, 2 + n)), padding=tuple(range(n)), stride=tuple(range(1, 1 + n))),
            5,
        ),
        "1x1-nobias": (dict(kernel_size=rep(1), bias=False), 5),
    }
    kw, size = cases[case]
    if n == 3 and case != "tuple-pad":  # 3-d convs on fp64 CPU are slow: the smallest size each case allows
        size -= 2
    return kw, size


MODES = ["zeros", "reflect", "replicate", "circular"]
CASES = ["pad1-stride2", "same-even-k", "same-dilated", "valid-dilated", "tuple-pad", "1x1-nobias"]
# Every (dim, geometry, padding mode); the loss reduction alternates so that each dim, geometry and mode
# meets both (the reduction only changes the engine's scaling, not the conv's geometry).
STEP_CASES = [
    (n, case, mode, ("mean", "sum")[(n + i + j) % 2])
    for n in (1, 2, 3)
    for i, case in enumerate(CASES)
    for j, mode in enumerate(MODES)
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("n,case,padding_mode,reduction", STEP_CASES)
def test_dp_conv_step_matches_naive(n, case, padding_mode, reduction):
    kw, size = geometry(n, case)
    torch.manual_seed(0)
    model = nn.Sequential(CONV[n](4, 6, padding_mode=padding_mode, **kw), nn.Tanh(), CONV[n](6, 2, 1)).double()
    x = torch.randn(5, 4, *[size] * n, dtype=torch.float64)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    got, expect, model, _ = dp_step(model, x, y, reduction)
    assert isinstance(model[0], DPCONV[n])
    assert_grads(got, expect)


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
@pytest.mark.parametrize("B", [0, 1, 4])
def test_dp_conv_batch_sizes_and_strategies(B, strategy):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2)).double()
    x = torch.randn(B, 3, 7, 6, dtype=torch.float64)
    y = torch.randn(B, 2, 3, 2, dtype=torch.float64)
    got, expect, _, _ = dp_step(model, x, y, "sum", strategy=strategy)
    assert_grads(got, expect)


def test_dp_conv_ghost_path_and_grad_input():
    """A layer where the FLOP rule picks ghost norm (few output positions, many channels); the input's gradient
    (grad_input of both layers) equals torch's."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Tanh(), nn.Conv2d(16, 12, 2, groups=4)).double()
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    y = torch.randn(4, 12, 2, 2, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    ((copy.deepcopy(model)(xr) - y) ** 2).sum().backward()
    xd = x.clone().requires_grad_(True)
    got, expect, model, _ = dp_step(model, xd, y, "sum")
    assert model[0].dp_norm_method == "ghost" and model[2].dp_norm_method == "ghost"
    assert_grads(got, expect)
    torch.testing.assert_close(xd.grad, xr.grad, **F64)


def test_dp_conv_inst_path():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1)).double()
    x = torch.randn(3, 2, 40, dtype=torch.float64)  # T = 40 output positions, d = 6, p = 3: inst
    y = torch.randn(3, 3, 40, dtype=torch.float64)
    got, expect, model, _ = dp_step(model, x, y, "mean")
    assert model[0].dp_norm_method == "inst"
    assert_grads(got, expect)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_dp_conv_frozen_parameter(n, frozen):
    torch.manual_seed(4)
    model = nn.Sequential(CONV[n](3, 6, 2, groups=3, padding=1), nn.Tanh(), CONV[n](6, 2, 1)).double()
    getattr(model[0], frozen).requires_grad_(False)
    x = torch.randn(4, 3, *[4] * n, dtype=torch.float64)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    got, expect, model, _ = dp_step(model, x, y, "mean")
    assert f"0.{frozen}" not in got
    if frozen == "weight":
        assert model[0].dp_norm_method == "bias-only"
    assert_grads(got, expect)


class TwiceUsed(nn.Module):
    """One conv applied to x and to a strided view of x (different numbers of output positions)."""

    def __init__(self, n):
        super().__init__()
        self.conv = CONV[n](3, 3, 3, padding=1, padding_mode="reflect")
        self.head = CONV[n](3, 2, 1)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        sub = x[(slice(None), slice(None)) + (slice(None, None, 2),) * (x.dim() - 2)]
        h2 = torch.tanh(self.conv(sub))  # second use of the same weights
        h3 = self.conv(h)  # third use, on the first use's output
        pooled = h2.flatten(2).mean(2)[(...,) + (None,) * (x.dim() - 2)]
        return self.head(h3 + pooled)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_dp_conv_used_several_times(n, reduction):
    torch.manual_seed(5)
    model = TwiceUsed(n).double()
    x = torch.randn(4, 3, *[5] * n, dtype=torch.float64)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    got, expect, _, _ = dp_step(model, x, y, reduction)
    assert_grads(got, expect)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_dp_conv_forward_and_state_dict_match_torch(n):
    torch.manual_seed(6)
    conv = CONV[n](4, 6, 3, padding="same", padding_mode="circular", dilation=2, groups=2)
    dp = DPCONV[n].from_module(conv)
    assert dp.weight is conv.weight and dp.bias is conv.bias
    assert list(dp.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, 4, *[7] * n)
    torch.testing.assert_close(dp(x), conv(x), rtol=0, atol=0)  # engine not attached: torch's own forward
    model, _ = dpkernels.make_private(
        nn.Sequential(dp), torch.optim.SGD(dp.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=2.0
    )
    # The DP forward (explicit padding, then torch.convolution) equals torch's; fp32 rounding of a different
    # call path, 1e-6 relative is ~10 ulps.
    torch.testing.assert_close(model(x), conv(x), rtol=1e-6, atol=1e-6)


def test_dp_conv_autocast_bf16_norms():
    """Under CPU autocast (bf16) the layer's per-sample norms stay within the bf16 rounding bound of the
    exact (float64) norms: the norms depend only on x and g, rounded to bf16 (u = 2^-8), so each norm moves by
    at most (2u + u^2) ||M_i|| with M_i = |G_i|^T |A_i|, plus fp32 accumulation (n u32 ||M||^2 / ||E||, see
    tests/ops/test_conv_ops.py::test_conv_norms_bf16_within_rounding_bound)."""
    torch.manual_seed(7)
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate")
    x = torch.randn(5, 4, 6, 6)
    r = torch.randn(5, 6, 6, 6)
    ref_conv = copy.deepcopy(conv).double()

    def ps_grad(xx, rr):
        ps = oracle.per_sample_grads(ref_conv, lambda m, s: (m(s[0]) * s[1]).sum(), (xx, rr))
        return ps["weight"], ps["bias"]

    gw, gb = ps_grad(x.double(), r.double())
    exact_w, exact_b = gw.flatten(1).norm(dim=1), gb.norm(dim=1)
    mw, mb = ps_grad(x.double().abs(), r.double().abs())  # replicate padding copies |x| too
    m_w, m_b = mw.flatten(1).norm(dim=1), mb.norm(dim=1)

    model, opt = dpkernels.make_private(
        nn.Sequential(conv), torch.optim.SGD(conv.parameters(), lr=0.1), noise_multiplier=0.0,
        expected_batch_size=5.0, loss_reduction="sum", max_grad_norm=1e9,
    )  # fmt: skip
    recorded = []
    orig = ConvFunction.norms

    def recording(module, uses):
        assert all(s.x.dtype == torch.bfloat16 and g.dtype == torch.bfloat16 for s, g in uses)
        out = orig(module, uses)
        recorded.append(out)
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(ConvFunction, "norms", staticmethod(recording))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16
            # the DP forward equals torch's autocast forward (same casts, same kernel)
            torch.testing.assert_close(out, F.conv2d(F.pad(x, [1] * 4, mode="replicate"), conv.weight, conv.bias))
        (out.float() * r).sum().backward()
    finally:
        mp.undo()
    assert len(recorded) == 1
    got = recorded[0]
    u, u32 = 2.0**-8, 2.0**-24
    T, d, p = 36, 36, 6
    n_terms = max(T * T + d + p, T + d * p)
    for key, exact, m in ((id(conv.weight), exact_w, m_w), (id(conv.bias), exact_b, m_b)):
        assert got[key].dtype == torch.float64  # certified norms (dpkernels.ops.certified) are float64
        err = (got[key].double().sqrt() - exact).abs()
        bound = (2 * u + u * u) * m + n_terms * u32 * m.square() / exact
        assert bool((err <= bound).all()), (err, bound)
    # No clipping (R huge): the step's gradient is the plain sum, from bf16 x and g accumulated in fp32;
    # each entry within (2u + u^2) sum_i |M_i| + fp32 accumulation (B T u32 on the same scale).
    bound_w = (2 * u + u * u + 5 * T * u32) * mw.sum(0)
    assert bool(((conv.weight.grad.double() - gw.sum(0)).abs() <= bound_w).all())


def test_dp_conv_unbatched_input_is_refused():
    conv = nn.Conv2d(2, 3, 3)
    model, _ = dpkernels.make_private(
        nn.Sequential(conv), torch.optim.SGD(conv.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=2.0
    )
    with pytest.raises(ValueError, match=r"DPConv2d.*batched input.*unsqueeze"):
        model(torch.randn(2, 5, 5))
    with torch.no_grad():  # no per-sample work needed: torch's unbatched forward
        assert model(torch.randn(2, 5, 5)).shape == (3, 3, 3)


@pytest.mark.parametrize("shared_factors", [True, False])
def test_conv_function_several_uses_norms_and_noise_once(shared_factors):
    """ConvFunction.norms / clipped_sum on two uses of one layer (different spatial sizes): the norm is that
    of the summed per-sample gradient, and the chained clipped sum adds prev, scale and noise exactly once."""
    from dpkernels.engine import SumSpec
    from dpkernels.functional.conv import ConvSaved
    from dpkernels.ops.reference import gaussian

    torch.manual_seed(8)
    conv = DPConv2d(3, 4, 3, padding=1, stride=(1, 2)).double()
    B = 3
    xs = [torch.randn(B, 3, 5, 6, dtype=torch.float64), torch.randn(B, 3, 4, 9, dtype=torch.float64)]
    gs = [torch.randn_like(conv._conv_forward(x, conv.weight, conv.bias)).detach() for x in xs]
    uses = [(ConvSaved(x, (3, 3), (1, 2), (1, 1), (1, 1), 1), g) for x, g in zip(xs, gs)]

    gw = torch.zeros(B, *conv.weight.shape, dtype=torch.float64)
    gb = torch.zeros(B, 4, dtype=torch.float64)
    for x, g in zip(xs, gs):  # naive per-sample gradient, summed over the uses
        for i in range(B):
            w = conv.weight.detach().clone().requires_grad_(True)
            b = conv.bias.detach().clone().requires_grad_(True)
            dw, db = torch.autograd.grad((F.conv2d(x[i : i + 1], w, b, (1, 2), 1) * g[i : i + 1]).sum(), [w, b])
            gw[i] += dw
            gb[i] += db

    norms = ConvFunction.norms(conv, uses)
    torch.testing.assert_close(norms[id(conv.weight)], gw.flatten(1).square().sum(1), **F64)
    torch.testing.assert_close(norms[id(conv.bias)], gb.square().sum(1), **F64)

    c = torch.rand(B, dtype=torch.float64)
    cb = c if shared_factors else c.clone()
    pw, pb = torch.randn_like(conv.weight).detach(), torch.randn_like(conv.bias).detach()
    specs = {
        id(conv.weight): SumSpec(c=c, prev=pw, noise_std=0.5, scale=0.3, seed=21),
        id(conv.bias): SumSpec(c=cb, prev=pb, noise_std=0.5, scale=0.3, seed=22),
    }
    out = ConvFunction.clipped_sum(conv, uses, specs)
    zw = gaussian(conv.weight.shape, 21, "cpu", torch.float64)
    zb = gaussian(conv.bias.shape, 22, "cpu", torch.float64)
    ew = 0.3 * (pw + (gw * c.view(-1, 1, 1, 1, 1)).sum(0) + 0.5 * zw)
    eb = 0.3 * (pb + (gb * c[:, None]).sum(0) + 0.5 * zb)
    torch.testing.assert_close(out[id(conv.weight)], ew, **F64)
    torch.testing.assert_close(out[id(conv.bias)], eb, **F64)
