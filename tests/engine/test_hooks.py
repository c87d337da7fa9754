"""Gradient hooks on DP parameters are refused by name. Autograd never hands a DP parameter its gradient
(the DP layer returns None for it; the engine writes the private gradient after the pass or at the step),
so a Tensor.register_hook hook would see None and a post-accumulate-grad hook an old or missing .grad."""

from __future__ import annotations

import pytest
import torch

import dpkernels

from .zoo import BY_NAME, batch, batch_loss

HOOKS = {
    "register_hook": lambda p: p.register_hook(lambda g: g),
    "register_post_accumulate_grad_hook": lambda p: p.register_post_accumulate_grad_hook(lambda t: None),
}


def _private(model, **kw):
    kw = dict(dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0), **kw)
    return dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


@pytest.mark.parametrize("kind", list(HOOKS))
def test_hook_on_a_dp_parameter_is_refused_at_make_private(kind):
    model = BY_NAME["mlp"].build()
    handle = HOOKS[kind](model[2].bias)
    with pytest.raises(RuntimeError, match=rf"parameter '2.bias' has a Tensor.{kind} hook.*handle.remove\(\)"):
        _private(model)
    handle.remove()
    _private(model)  # without it, accepted


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
@pytest.mark.parametrize("kind", list(HOOKS))
def test_hook_added_after_make_private_is_refused_before_it_runs(kind, strategy):
    case = BY_NAME["mlp"]
    x, y = batch(case, 4)
    model, opt = _private(case.build(), strategy=strategy)
    seen = []
    if kind == "register_hook":
        model[0].weight.register_hook(lambda g: seen.append(g))
    else:
        model[0].weight.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad))
    loss = batch_loss(case, model(x), y, "mean")
    with pytest.raises(RuntimeError, match=rf"parameter '0.weight' has a Tensor.{kind} hook"):
        opt.backward(loss)
    assert seen == [], "the hook ran and saw a gradient that is not the private one"
    assert all(p.grad is None for p in model.parameters())


def test_hooks_elsewhere_are_untouched():
    """Hooks on inputs and activations see their ordinary gradients."""
    case = BY_NAME["mlp_frozen"]
    x, y = batch(case, 4)
    model, opt = _private(case.build())
    seen = {}
    x = x.clone().requires_grad_(True)
    x.register_hook(lambda g: seen.setdefault("input", g))
    h = model[0](x)
    h.register_hook(lambda g: seen.setdefault("activation", g))
    loss = batch_loss(case, model[1:](h), y, "mean")
    loss.backward()
    opt.step()
    assert set(seen) == {"input", "activation"}
    torch.testing.assert_close(seen["input"], x.grad, rtol=0, atol=0)
