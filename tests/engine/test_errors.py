"""Errors a user can reach name what is wrong and the fix: no bare KeyError, AttributeError or TypeError
from the engine's lookups, and nothing silently dropped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels import api

from .zoo import BY_NAME, batch, batch_loss


def _private(model, **kw):
    kw = dict(dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0, sample_rate=0.01), **kw)
    return dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


@pytest.mark.parametrize(
    "entry",
    [
        {},
        {"steps": "3"},
        {"steps": 3, "accountant": {"history": []}},
        {"steps": 3, "accountant": {"mechanism": "rdp", "history": [(1.0, 0.01)]}},
        [3],
    ],
    ids=["empty", "steps-not-int", "no-mechanism", "short-history", "not-a-dict"],
)
def test_malformed_optimizer_state_is_named_and_loads_nothing(entry):
    model, opt = _private(BY_NAME["mlp"].build())
    state = opt.state_dict()
    state["dpkernels"] = entry
    state["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match="'dpkernels' entry is malformed: expected .* DPOptimizer.state_dict"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.1  # nothing loaded
    assert opt.engine.steps == 0 and opt.accountant.steps == 0


def test_mechanism_mismatch_loads_nothing():
    model, opt = _private(BY_NAME["mlp"].build())
    state = opt.state_dict()
    state["dpkernels"]["accountant"]["mechanism"] = "pld"
    state["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match="accountant='pld'"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("when", ["before forward", "between forward and backward"])
def test_parameter_replaced_after_make_private_is_named(when):
    """A new Parameter object on a DP layer (assignment, load_state_dict(assign=True)) is not the engine's:
    its gradient would be silently never written while the old one is noised. The model's forward checks
    this; a replacement after the forward is caught at backward."""
    case = BY_NAME["mlp"]
    x, y = batch(case, 4)
    model, opt = _private(case.build())
    new = nn.Parameter(model[2].weight.detach().clone())
    if when == "before forward":
        model[2].weight = new
        with pytest.raises(RuntimeError, match=r"parameter 2\.weight was replaced after make_private"):
            model(x)
    else:
        loss = batch_loss(case, model(x), y, "mean")
        model[2].weight = new
        with pytest.raises(RuntimeError, match=r"parameter 'weight' of DP layer '2' is not one the engine was given"):
            loss.backward()
    assert all(p.grad is None for p in model.parameters())


def test_api_names_a_parameter_the_layer_type_does_not_have():
    lin = nn.Linear(3, 2)
    lin.register_parameter("scale", nn.Parameter(torch.ones(2)))
    a, g = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"Linear has trainable parameter\(s\) \['scale'\]"):
        api.per_sample_norms(lin, a, g)
    with pytest.raises(ValueError, match=r"Linear has trainable parameter\(s\) \['scale'\]"):
        api.clipped_sum(lin, a, g, torch.ones(4))


def test_two_batch_sizes_in_one_backward_are_named_as_such():
    """m(x) and m(x[2:]) summed into one backward: refused (rows would pair by position across the two), with
    an error that says what happened instead of a contradictory "a batch of 4 while the model's batch has 4"."""
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    m, opt = dpkernels.make_private(
        m, torch.optim.SGD(m.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4
    )
    x = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match=r"saw a batch of 4 samples in a backward pass whose other uses had 2"):
        (m(x).sum() + m(x[2:]).sum()).backward()
    assert all(p.grad is None for p in m.parameters())
