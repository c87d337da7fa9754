"""Writes during backward: model code that registers a tensor hook in the training forward runs
that hook inside backward, after the forward's end. A hook that writes a value of the
batch into a parameter's memory (``.data``: no version counter) puts that sample into the model unnoised:
into a frozen parameter (released with the model by state_dict) or a trainable one (the step adds noise to
its gradient, not to what was written); before the guard hashed the model at the end of the backward, max |x|
of the batch (200.498) was stored in both, the step and the next forward accepted, state_dict returned it.
The second hash is made when the forward's backward ends (and the flag read with its one host read), so a
hook, an autograd Function and two-pass's second backward are all compared; legitimate changes (a step, a
load_state_dict) between a forward with no backward and the next one are not taken for writes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkernels

B = 4


class _HookWriter(nn.Module):
    def __init__(self, target: str):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.frozen = nn.Linear(3, 2)
        self.frozen.requires_grad_(False)
        self.target = target

    def forward(self, x):
        h = self.lin(x)
        w = getattr(self, self.target).weight
        m = float(x.detach().abs().amax())
        if h.requires_grad:
            h.register_hook(lambda g: w.data.__setitem__((0, 0), m))  # runs in backward
        return self.frozen(h)


@pytest.mark.parametrize("target", ["frozen", "lin"])
def test_tensor_hook_writing_a_parameter_in_backward_is_refused(target):
    torch.manual_seed(0)
    model = _HookWriter(target)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B)
    x = torch.randn(B, 4, generator=torch.Generator().manual_seed(1)) * 100
    with pytest.raises(RuntimeError, match=rf"'{target}.weight'.*written during .*backward pass"):
        model(x).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())  # refused before any .grad is written
    with pytest.raises(RuntimeError, match="not released"):
        model.state_dict()


class _FunctionWriter(torch.autograd.Function):
    """An identity whose backward writes the batch's peak into a buffer's memory."""

    @staticmethod
    def forward(ctx, x, buf):
        ctx.buf, ctx.peak = buf, float(x.detach().abs().amax())
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.buf.data[0] = ctx.peak
        return g, None


class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("stat", torch.zeros(3))

    def forward(self, x):
        return _FunctionWriter.apply(self.lin(x), self.stat)


def _private(model, **kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    kw = {"noise_multiplier": 0.0, "max_grad_norm": 1.0, "expected_batch_size": B, **kw}
    return dpkernels.make_private(model, opt, **kw)


def _x(seed=1):
    return torch.randn(B, 4, generator=torch.Generator().manual_seed(seed)) * 100


def test_autograd_function_writing_a_buffer_in_backward_is_refused():
    model, opt = _private(_WithBuffer())
    with pytest.raises(RuntimeError, match=r"'stat'"):
        model(_x()).square().sum().backward()
    assert float(model.stat[0]) != 0.0  # the write happened; the refusal is what keeps it from release
    with pytest.raises(RuntimeError, match="not released"):
        torch.save(model, __import__("io").BytesIO())


class _SecondPassWriter(_HookWriter):
    """Writes only when its hook runs the second time: two-pass's clipping pass."""

    def forward(self, x):
        h = self.lin(x)
        w, m, calls = self.frozen.weight, float(x.detach().abs().amax()), []

        def hook(g):
            calls.append(1)
            if len(calls) == 2:
                w.data[0, 0] = m

        if h.requires_grad:
            h.register_hook(hook)
        return self.frozen(h)


def test_write_in_the_clipping_pass_of_two_pass_is_refused():
    torch.manual_seed(0)
    model, opt = _private(_SecondPassWriter("frozen"), strategy="two-pass")
    with pytest.raises(RuntimeError, match=r"'frozen.weight'.*backward pass"):
        opt.backward(model(_x()).square().sum())


def test_write_in_a_backward_run_after_another_forward_is_refused():
    """Two forwards, then their backwards in the other order: the first forward's hash waits for its own
    backward (the second forward and the first backward do not close it)."""
    torch.manual_seed(0)
    model, opt = _private(_HookWriter("frozen"), accumulation_steps=2)
    l1 = model(_x(1)).square().sum()
    model.frozen.weight.data[0, 0] = float(_x(2).abs().amax())  # the value fwd 2's hook will write: a no-op then
    l2 = model(_x(2)).square().sum()
    l2.backward()
    with pytest.raises(RuntimeError, match=r"'frozen.weight'.*backward pass"):
        l1.backward()


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.frozen = nn.Linear(3, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.lin(x))


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
def test_legitimate_changes_between_forwards_are_not_refused(strategy):
    """A forward whose backward never comes (its output kept), then a step, a load_state_dict of another
    state, gradient accumulation: none is a write of a training forward."""
    torch.manual_seed(0)
    model, opt = _private(_Plain(), strategy=strategy, accumulation_steps=2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(3):
        for micro in range(2):
            opt.backward(model(_x(10 * step + micro)).square().sum())
        kept = model(_x(99))  # a training forward with no backward, its graph alive across the step
        opt.step()
        opt.zero_grad()
        del kept
    assert not torch.equal(model.lin.weight, saved["lin.weight"])
    probe = model(_x(98)).square().sum()  # no backward either: then a load of the saved state
    model.load_state_dict(saved)
    del probe
    opt.backward(model(_x(5)).square().sum())
    opt.backward(model(_x(6)).square().sum())
    opt.step()
    assert model.state_dict().keys() == saved.keys()
