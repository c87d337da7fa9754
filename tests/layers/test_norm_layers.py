"""DPLayerNorm, DPRMSNorm, DPGroupNorm: torch's forward/state_dict/grad_input, and one noiseless DP step
equal to the naively clipped sum of per-sample gradients (a loop over samples with torch's autograd on an
unconverted copy, float64), for loss reduction "mean" and "sum", the layer used once or twice.

Tolerance (float64): the engine's sums run in other orders than the oracle's (xhat recomputed, rows
concatenated), a few ulps times < 1e3 terms, < 1e-12 relative; rtol=1e-9 keeps a margin while a wrong
clip factor (the abadi epsilon alone is 1e-6 relative), scale or norm fails.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _layer_oracle import DT, EBS, clipped_update, per_sample_grads, per_sample_loss, sq_norms
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import dpkernels
from dpkernels.nn import DPGroupNorm, DPLayerNorm, DPRMSNorm

TOL = dict(rtol=1e-9, atol=1e-12)


def dp_step(model, x, y, red, R, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=EBS, loss_reduction=red, **kw
    )
    loss = per_sample_loss(model, x, y)
    opt.backward(loss.mean() if red == "mean" else loss.sum())
    opt.step()  # lr = 0: only finishes parameters no sample reached (an empty batch)
    name = {id(p): n for n, p in model.named_parameters()}
    groups = [[name[id(p)] for p in ps] for ps in opt.engine.groups]
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, groups, opt


class Net(nn.Module):
    """norm -> (norm again on a different input) -> Linear head on the last dimension."""

    def __init__(self, norm: nn.Module, last: int, twice: bool):
        super().__init__()
        self.norm, self.twice = norm, twice
        self.head = nn.Linear(last, 3)

    def forward(self, x):
        h = self.norm(x)
        if self.twice:
            h = self.norm(torch.tanh(h) * 1.7 + x)
        return self.head(h)


def check_step(norm: nn.Module, xshape: tuple[int, ...], twice: bool, red: str, seed: int, **kw):
    torch.manual_seed(seed)
    for p in norm.parameters():  # affine parameters away from their (1, 0) init: a stronger test
        nn.init.normal_(p, mean=0.5, std=1.0)
    model = Net(norm, xshape[-1], twice).to(DT)
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(*xshape, generator=gen, dtype=DT) + 0.5
    y = torch.randn(*xshape[:-1], 3, generator=gen, dtype=DT)
    grads = per_sample_grads(ref, x, y)
    norms = sq_norms(grads, list(grads)).sqrt()
    # the median per-sample norm: some samples clipped, some not
    R = norms.median().item() if norms.numel() and norms.max() > 0 else 1.0
    xr, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    lr = per_sample_loss(ref, xr, y)
    (lr.mean() if red == "mean" else lr.sum()).backward()
    got, groups, opt = dp_step(model, xd, y, red, R, **kw)
    want = clipped_update(grads, groups, opt.engine.bounds, red)
    assert isinstance(model.norm, dpkernels.DP_LAYERS[type(ref.norm)])
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")
    if kw.get("strategy") != "two-pass":  # two backward passes accumulate x.grad twice (the engine's design)
        torch.testing.assert_close(xd.grad, xr.grad, **TOL)  # grad_input exactly as torch
    return opt, norms, R


common = dict(
    B=st.integers(0, 4),
    lead=st.lists(st.integers(1, 3), max_size=2),
    twice=st.booleans(),
    red=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=25, deadline=None)
@given(**common, ns=st.lists(st.integers(1, 4), min_size=1, max_size=2), affine=st.booleans(), bias=st.booleans())
@example(B=0, lead=[2], twice=True, red="sum", seed=0, ns=[3], affine=True, bias=True)
@example(B=1, lead=[], twice=False, red="mean", seed=1, ns=[5], affine=True, bias=True)
@example(B=3, lead=[1], twice=True, red="mean", seed=2, ns=[3, 2], affine=True, bias=False)
def test_layernorm_step(B, lead, twice, red, seed, ns, affine, bias):
    norm = nn.LayerNorm(ns, elementwise_affine=affine, bias=bias)
    check_step(norm, (B, *lead, *ns), twice, red, seed)


@settings(max_examples=25, deadline=None)
@given(**common, ns=st.lists(st.integers(1, 4), min_size=1, max_size=2), eps=st.sampled_from([None, 1e-3]))
@example(B=0, lead=[2], twice=True, red="sum", seed=0, ns=[3], eps=None)
@example(B=1, lead=[], twice=False, red="mean", seed=1, ns=[5], eps=1e-3)
def test_rmsnorm_step(B, lead, twice, red, seed, ns, eps):
    check_step(nn.RMSNorm(ns, eps=eps), (B, *lead, *ns), twice, red, seed)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(0, 4),
    groups=st.integers(1, 3),
    per_group=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 3), max_size=3),
    affine=st.booleans(),
    twice=st.booleans(),
    red=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**31 - 1),
)
@example(B=0, groups=2, per_group=2, spatial=[3], affine=True, twice=True, red="sum", seed=0)
@example(B=1, groups=1, per_group=3, spatial=[], affine=True, twice=False, red="mean", seed=1)
@example(B=3, groups=3, per_group=1, spatial=[2, 1, 3], affine=True, twice=True, red="mean", seed=2)
def test_groupnorm_step(B, groups, per_group, spatial, affine, twice, red, seed):
    assume(per_group * math.prod(spatial) > 1)  # torch's GroupNorm needs more than one value per group
    C = groups * per_group
    check_step(nn.GroupNorm(groups, C, affine=affine), (B, C, *spatial), twice, red, seed)


@pytest.mark.parametrize("kw", [{}, {"groups": "layer-wise"}, {"groups": "param-wise"}, {"strategy": "two-pass"}])
def test_clipping_modes(kw):
    """A fixed case in other clipping groups and strategies; the bound binds for some samples."""
    opt, norms, R = check_step(nn.LayerNorm(4), (5, 3, 4), True, "mean", 3, **kw)
    assert opt.engine.report().count("direct") == 1
    assert bool((norms > R).any()) and bool((norms < R).any())


def test_forward_state_dict_and_from_module_match_torch():
    cases = [
        (nn.LayerNorm([3, 4], bias=False), (2, 5, 3, 4)),
        (nn.LayerNorm(4, elementwise_affine=False), (2, 4)),
        (nn.RMSNorm(4), (2, 3, 4)),
        (nn.GroupNorm(2, 4), (2, 4, 3, 2)),
    ]
    for layer, shape in cases:
        dp = dpkernels.DP_LAYERS[type(layer)].from_module(layer)
        assert type(dp) in (DPLayerNorm, DPRMSNorm, DPGroupNorm)
        assert all(p is q for p, q in zip(dp.parameters(), layer.parameters(), strict=True))
        assert dp.state_dict().keys() == layer.state_dict().keys()
        assert repr(dp).split("(", 1)[1] == repr(layer).split("(", 1)[1]
        x = torch.randn(shape)
        torch.testing.assert_close(dp(x), layer(x), rtol=0, atol=0)  # no engine: torch's forward itself
    with pytest.raises(TypeError, match="takes a LayerNorm"):
        DPLayerNorm.from_module(nn.RMSNorm(4))


def test_input_without_batch_dimension_is_refused():
    model = nn.Sequential(nn.LayerNorm(4))
    model, _ = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=2.0
    )
    with pytest.raises(ValueError, match="DPLayerNorm.*batch"):
        model(torch.randn(4))


def _autocast_case(layer, shape):
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    ref = copy.deepcopy(model)
    x = torch.randn(*shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(x.bfloat16())
        want.float().square().sum().backward()
    # R huge: every clip factor is 1 and the DP gradient is the plain gradient
    model, opt = dpkernels.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=1e9,
        expected_batch_size=1.0,
        loss_reduction="sum",
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x.bfloat16())
        got.float().square().sum().backward()
    return got, want, model, ref


@pytest.mark.parametrize(
    "layer,shape", [(nn.LayerNorm(6), (3, 5, 6)), (nn.RMSNorm(6), (3, 5, 6)), (nn.GroupNorm(2, 6), (3, 6, 5))]
)
def test_autocast_follows_torch(layer, shape):
    got, want, model, ref = _autocast_case(layer, shape)
    assert got.dtype == want.dtype  # torch's own policy for the device (bf16 out on CPU, fp32 on CUDA)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same torch op under the same autocast
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        # xhat for the engine is recomputed in bf16 (torch's forward dtype here), torch's backward keeps
        # fp32 internally: each term differs by <= 2^-8 relative, so the sums by about as much; 2e-2
        # relative with an atol of 2e-2 * max|grad| covers it and still fails a wrong formula (O(1)).
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-2 * scale, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["layer", "group"])
def test_cuda_autocast_runs_in_fp32(kind):
    layer = (nn.LayerNorm(8) if kind == "layer" else nn.GroupNorm(2, 8)).cuda()
    model = nn.Sequential(layer)
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, expected_batch_size=1.0
    )
    x = torch.randn(4, 8, 3, device="cuda")
    x = x.transpose(1, 2).contiguous() if kind == "layer" else x
    with torch.autocast("cuda", dtype=torch.float16):
        y = model(x.half())
    assert y.dtype == torch.float32
    # per-sample losses: a scalar mean loss under 16-bit autocast is refused (tests/engine/test_amp.py)
    opt.backward(y.square().flatten(1).sum(1))
    assert all(math.isfinite(p.grad.abs().sum().item()) for p in model.parameters())
