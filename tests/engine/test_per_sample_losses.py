"""optimizer.backward(per_sample_losses): the engine reduces the (B,) losses itself, so the step does not
depend on a hand-written reduction matching loss_reduction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkernels

from .zoo import BY_NAME, batch

B = 6


def _step(case, x, y, loss_of, **kw):
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=0.3, expected_batch_size=B, **kw
    )
    opt.backward(loss_of(case.loss(model(x), y)))
    opt.step()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["mlp", "conv2d", "embedding", "tied"])
def test_per_sample_losses_equal_the_matching_reduction(name, reduction, strategy):
    """float64: giving the losses per sample is the step of the reduction loss_reduction names (1e-12: the
    two differ by one multiplication and division by B per G row)."""
    case = BY_NAME[name]
    x, y = batch(case, B)
    kw = {"loss_reduction": reduction, "strategy": strategy}
    reduce = (lambda v: v.mean()) if reduction == "mean" else (lambda v: v.sum())
    want = _step(case, x, y, reduce, **kw)
    got = _step(case, x, y, lambda v: v, **kw)
    assert want.norm() > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_per_sample_losses_keep_the_bound_where_a_mismatched_reduction_breaks_it():
    """The adversarial review's case: a sum loss under loss_reduction="mean" scales every G row by B, so one
    large sample's removal moved the step by 1.83 R (1.32 R here). Per-sample losses: at most R / E."""
    torch.manual_seed(0)
    x = torch.full((B, 4), 0.3 / B, dtype=torch.float64)
    x[0, 0] = 1e3

    def step(xs, loss_of):
        m = nn.Linear(4, 1, bias=False).double()
        nn.init.ones_(m.weight)
        m, opt = dpkernels.make_private(
            m, torch.optim.SGD(m.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B
        )
        opt.backward(loss_of(m(xs)[:, 0]))
        opt.step()
        return m.weight.grad.flatten()

    wrong = (step(x, lambda v: v.sum()) - step(x[1:], lambda v: v.sum())).norm() * B
    right = (step(x, lambda v: v) - step(x[1:], lambda v: v)).norm() * B
    assert wrong > 1.2  # the documented hazard is real (1.32 R here)
    assert right <= 1.0 * (1 + 1e-5)


def test_per_sample_losses_of_the_wrong_length_are_refused():
    case = BY_NAME["mlp"]
    x, y = batch(case, B)
    model = case.build()
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, expected_batch_size=B
    )
    with pytest.raises(ValueError, match="one loss per sample"):
        opt.backward(case.loss(model(x), y)[:-1])
