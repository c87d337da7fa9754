"""One noiseless DP step equals the naively clipped sum, in every clipping mode.

Grid: clipping group spec x clip function x strategy x loss reduction, on every model of
the zoo. The oracle (tests/engine/zoo.py) takes per-sample gradients from torch.func in
float64, groups parameters and clips them independently of dpkernels.clipping, and sums.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import nn

import dpkernels

from .zoo import (
    BY_NAME,
    CASES,
    Case,
    batch,
    batch_loss,
    dp_module_names,
    group_norms,
    per_sample_grads,
    reference_groups,
    reference_update,
    require,
    trainable,
)

B = 7  # odd, and != EBS so dividing by the realised batch size instead of the expected one fails
EBS = 5.0
# float64 throughout; the engine's norms take other summation orders (ghost norm: Gram products)
# than the oracle's flattened per-sample gradients, so results differ by a few ulps times the
# number of terms (< 1e-13 relative here); 1e-9 keeps a wide margin while any wrong clip factor,
# bound or scale (all >= 1e-6 relative: the abadi epsilon alone is 1e-6) fails.
TOL = dict(rtol=1e-9, atol=1e-12)

GROUP_SPECS = ["all-layer", "layer-wise", "param-wise", "lists", "callable"]


@functools.cache
def _oracle(name: str, b: int = B) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    case = BY_NAME[name]
    x, y = batch(case, b)
    return per_sample_grads(case.build(), case, x, y), x, y


def _spec(model: nn.Module, kind: str):
    """The group spec and max_grad_norm for ``kind``; R is set from the data so that some samples are clipped."""
    mods = dp_module_names(model)
    if kind == "lists":  # user order reversed w.r.t. model order, with explicit per-group bounds
        return ([mods[1:], mods[:1]] if len(mods) > 1 else [mods]), "explicit"
    if kind == "callable":
        first = mods[0]
        return (lambda name, m: name == first), "float"
    return kind, "float"


def _bounds(ps, groups, how: str):
    """Bounds near the median per-sample group norm: about half the samples are clipped in each group."""
    med = group_norms(ps, groups).median(dim=1).values
    if how == "explicit":
        return [float(m) * f for m, f in zip(med, (0.8, 1.3))], [float(m) * f for m, f in zip(med, (0.8, 1.3))]
    R = float(group_norms(ps, [sum(groups, [])]).median())
    return R, [R / len(groups) ** 0.5] * len(groups)


def run_step(case: Case, kind: str, clipping: str, strategy: str, reduction: str, b: int = B):
    ps, x, y = _oracle(case.name, b)
    model = case.build()
    spec, how = _spec(model, kind)
    groups = reference_groups(model, spec)
    max_grad_norm, bounds = _bounds(ps, groups, how) if b > 1 else (1.0, [1.0 / len(groups) ** 0.5] * len(groups))
    expected = reference_update(ps, groups, bounds, clipping, EBS if reduction == "mean" else 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=EBS, groups=spec,
        clipping=clipping, strategy=strategy, loss_reduction=reduction,
    )  # fmt: skip
    loss = batch_loss(case, model(x), y, reduction)
    if strategy == "two-pass":
        opt.backward(loss)
    else:
        loss.backward()
    opt.step()
    return model, expected


def _check(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in expected:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, expected[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")
        elif not p.requires_grad:
            assert p.grad is None, f"frozen parameter {n} got a gradient"


MODES = list(itertools.product(GROUP_SPECS, ("abadi", "automatic"), ("bk", "two-pass"), ("mean", "sum")))
# By default the full grid on the MLP; on the other models every (group spec, clip function) pair
# once, with the (strategy, reduction) pairs taken in turn so each occurs; the full grid under -m slow.
_TURNS = list(itertools.product(("bk", "two-pass"), ("mean", "sum")))
FAST_SUBSET = {(*gc, *_TURNS[i % 4]) for i, gc in enumerate(itertools.product(GROUP_SPECS, ("abadi", "automatic")))}


def _params():
    for case in CASES:
        for mode in MODES:
            marks = [] if case.name == "mlp" or mode in FAST_SUBSET else [pytest.mark.slow]
            yield pytest.param(case, *mode, marks=marks, id=f"{case.name}-{'-'.join(mode)}")


@pytest.mark.parametrize("case,groups,clipping,strategy,reduction", list(_params()))
def test_noiseless_step_equals_naive_clipped_sum(case, groups, clipping, strategy, reduction):
    require(case)
    _check(*run_step(case, groups, clipping, strategy, reduction))


@pytest.mark.parametrize("b", [0, 1, 2])
@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_small_batches(b, strategy, reduction):
    # B = 0: an empty Poisson batch; the noiseless update is exactly zero
    _check(*run_step(BY_NAME["mlp"], "layer-wise", "abadi", strategy, reduction, b=b))


def test_bounds_follow_the_users_group_order():
    """max_grad_norm=[R_a, R_b] with groups=[[a...], [b...]] gives R_a to the first listed group,
    whatever the order of the layers in the model."""
    case = BY_NAME["mlp"]
    ps, x, y = _oracle(case.name)
    model = case.build()
    spec = [["4"], ["0", "2"]]  # the head first
    groups = reference_groups(model, spec)
    bounds = [1e-3, 1e3]  # clips the head hard, leaves the body unclipped: swapped bounds fail loudly
    expected = reference_update(ps, groups, bounds, "abadi", 1.0)
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=bounds,
        expected_batch_size=EBS, groups=spec, loss_reduction="sum",
    )  # fmt: skip
    batch_loss(case, model(x), y, "sum").backward()
    opt.step()
    _check(model, expected)


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
def test_frozen_parameters_get_no_grad_and_no_noise(strategy):
    case = BY_NAME["mlp_frozen"]
    model = case.build()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen  # the case freezes a bias and a whole layer
    x, y = batch(case, B)
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=EBS, strategy=strategy, seed=0,
    )  # fmt: skip
    opt.backward(batch_loss(case, model(x), y, "mean"))
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None, n
            assert torch.equal(p.detach(), frozen[n]), n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert set(trainable(model)) == {n for n, _ in model.named_parameters()} - set(frozen)


def test_a_model_that_is_one_layer_is_converted_in_place():
    """make_private(nn.Linear(...)): the layer itself becomes its DP twin (the same object, so a kept
    reference trains privately too) and steps like the same layer inside a Sequential."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 2)
    seq = nn.Sequential(nn.Linear(5, 2))
    seq[0].load_state_dict(lin.state_dict())
    x = torch.randn(4, 3, 5)
    grads = []
    for m in (lin, seq):
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        got, opt = dpkernels.make_private(m, opt, noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=4.0)
        assert got is m
        opt.zero_grad()
        m(x).square().sum().backward()
        opt.step()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert type(lin) is dpkernels.DPLinear
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same computation
    emb = nn.Embedding(5, 3, max_norm=1.0)  # the root goes through from_module's checks like any child
    with pytest.raises(ValueError, match="max_norm=1.0 renormalises"):
        dpkernels.make_private(
            emb, torch.optim.SGD(emb.parameters(), lr=0.0), noise_multiplier=0.0, expected_batch_size=4.0
        )
    assert type(emb) is nn.Embedding


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
def test_two_views_of_each_sample_in_one_backward(strategy):
    """Two forward calls before one backward (two augmented views of the same samples): sample i's
    gradient is the sum over both views, clipped once (the naive per-sample oracle in float64)."""
    import copy

    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.LayerNorm(3)).double()
    ref = copy.deepcopy(model)
    x1 = torch.randn(4, 2, 5, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn_like(x1)
    y = torch.randn(4, 2, 3, dtype=torch.float64)

    def per_sample_loss(params, a, b, t):
        out = [functional_call(ref, params, (v[None],)) for v in (a, b)]
        return sum(((o - t[None]) ** 2).sum() for o in out)

    params = {k: v.detach() for k, v in ref.named_parameters()}
    ps = vmap(grad(per_sample_loss), in_dims=(None, 0, 0, 0))(params, x1, x2, y)
    norms = torch.sqrt(sum(v.flatten(1).square().sum(1) for v in ps.values()))
    R = float(norms.median())
    c = (R / (norms + 1e-6)).clamp(max=1.0)  # Abadi clipping as dpkernels.clipping defines it
    want = {k: (c.view(-1, *[1] * (v.dim() - 1)) * v).sum(0) for k, v in ps.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=4.0, loss_reduction="sum",
        strategy=strategy,
    )  # fmt: skip
    loss = sum(((model(v) - y) ** 2).sum() for v in (x1, x2))
    opt.backward(loss)
    assert bool((c < 1).any()) and bool((c == 1).any())  # some samples clipped, some not
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-9, atol=1e-11)  # float64, summation order only
