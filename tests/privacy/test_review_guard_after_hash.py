"""Writes by model code after the guard's second hash of a training forward (made at the end of that forward's
backward pass) are not compared: the batch reaches released state with no refusal. Strict xfails, with the
measured effect: in each case the released buffer is the batch's first row, x[0] = [1.54, -0.29, -2.18].

Why not fixed here: each write lands after every comparison the guard makes, in a span where only
``optimizer.step()``, ``load_state_dict`` and the user's own code may change the model (a weight constraint, an
EMA, a buffer reset). Refusing any change there that the optimizer did not make needs a hash after each step and a
comparison at the next forward and at each release (two more hashes a step), and would refuse those legitimate
edits; the guard's documented gaps ("after the second hash") cover these routes. Also here: a forward's write
released before its check is read, by saving the tensors without state_dict (no hook runs on a tensor's pickling)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkernels

_queue = torch.autograd.Variable._execution_engine.queue_callback


class _Net(nn.Module):
    """A frozen buffer the forward writes from the batch, through an alias with a version counter of its own,
    by ``route`` (after the guard's last comparison)."""

    def __init__(self, route: str):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("stat", torch.zeros(3))
        self.route = route

    def forward(self, x):
        alias, value = self.stat.data, x.detach()[0].clone()
        if self.route == "late callback":  # queued by a hook on the input side: after the engine's callback
            x = x.clone().requires_grad_(True)
            x.register_hook(lambda g: _queue(lambda: alias.copy_(value)) and None)
        y = self.lin(x)
        if self.route == "graph freed":  # an object the graph holds writes when the graph is freed
            y = _Hold.apply(y, _OnFree(alias, value))
        if self.route == "output hook":  # within the window: the engine's end-of-pass read comes after it
            y.register_hook(lambda g: (alias.copy_(value), None)[-1])
        if self.route == "second backward":  # a hook that writes on its second call (retain_graph)
            calls = []
            y.register_hook(lambda g: (calls.append(1), len(calls) == 2 and alias.copy_(value), None)[-1])
        return y


class _OnFree:
    def __init__(self, alias, value):
        self.alias, self.value = alias, value

    def __del__(self):
        self.alias.copy_(self.value)


class _Hold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, obj):
        ctx.obj = obj
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g, None


def _private(route: str, **kw):
    torch.manual_seed(0)
    model = _Net(route)
    settings = dict(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4.0, seed=3)
    settings.update(kw)
    return dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)


X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))


def _released_or_refused(model) -> None:
    """Release the model's state; if it was not refused, it must equal the state before training."""
    state = model.state_dict()  # refused (RuntimeError) when the guard saw the write
    assert torch.equal(state["stat"], torch.zeros(3)), f"released with the batch: {state['stat'].tolist()}"


def _refused(model) -> None:
    with pytest.raises((RuntimeError, AssertionError)) as err:
        _released_or_refused(model)
    assert isinstance(err.value, RuntimeError), str(err.value)  # refused, not released with the batch


@pytest.mark.xfail(strict=True, reason="a callback queued late in backward runs after the guard's second hash")
@pytest.mark.parametrize("steps", [1, 2], ids=["plain", "accumulation"])
def test_a_callback_queued_late_in_backward(steps):
    model, opt = _private("late callback", accumulation_steps=steps)
    for _ in range(steps):
        model(X).square().sum(1).mean().backward()
    opt.step()
    _refused(model)


@pytest.mark.xfail(strict=True, reason="a graph-held object writes when the graph is freed, after the last hash")
def test_a_write_when_the_graph_is_freed():
    model, opt = _private("graph freed")

    def train():
        loss = model(X).square().sum(1).mean()
        loss.backward()
        opt.step()

    train()  # the graph (and the object it holds) is freed on return, after the second hash
    _refused(model)


@pytest.mark.xfail(strict=True, reason="a second backward over a retained graph writes after the forward's hash")
def test_a_write_in_a_second_backward_over_a_retained_graph():
    model, opt = _private("second backward")
    loss = model(X).square().sum(1).mean()
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError):  # the DP step refuses it, after the hook wrote
        loss.backward()
    _refused(model)


def test_a_write_within_the_window_is_refused():
    """Control: the same write from a hook on the output, in the forward's own backward pass, is refused."""
    model, opt = _private("output hook")
    with pytest.raises(RuntimeError, match=r"buffer 'stat' .*was written during a DP training forward or its backward"):
        model(X).square().sum(1).mean().backward()
    _refused(model)


class _Frozen(nn.Module):
    """A frozen layer whose weight the forward writes from the batch through ``.data`` (no version bump: only the
    hash sees it, at the end of the forward's backward pass, or at the next forward, step or state_dict)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        self.frozen.weight.data[0] = x.detach()[0]
        return self.lin(x)


@pytest.mark.xfail(strict=True, reason="tensors exported without state_dict while a forward's check is pending")
def test_parameters_exported_directly_after_a_forward_without_backward():
    """A training forward with no backward yet (a logged loss), then the parameters saved without state_dict
    (``dict(model.named_parameters())``): no hook runs before the tensors are pickled, so the pending check is
    never read. Measured: the saved frozen weight's row 0 is the batch's first row, bit for bit."""
    import io

    model = _Frozen()
    model, _ = dpkernels.make_private(
        model, torch.optim.SGD(model.lin.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
        expected_batch_size=4.0,
    )  # fmt: skip
    out = model(X)  # noqa: F841  # alive: its backward may still come, so the check waits
    buf = io.BytesIO()
    try:
        torch.save(dict(model.named_parameters()), buf)
    except RuntimeError:
        return  # refused
    buf.seek(0)
    assert not torch.equal(torch.load(buf)["frozen.weight"][0], X[0]), "released with the batch"
