"""strategy='two-pass' takes the clip factors from the norms pass and the clipped sums from a second backward over the
same graph. Model code can make that second backward's output gradients or saved activations differ (a tensor hook
that scales the gradient on its second call, a saved-tensors unpack hook): the sums then used gradients the factors
never saw, and one sample moved the update by 1000 R (measured: update norm 1000.0 with R = 1, one sample, no
noise). The clipping pass now takes the norms again and refuses the step, before any .grad is written, when a
sample's norm grew."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkernels

R = 1.0


class _Net(nn.Module):
    def __init__(self, how: str | None):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.how = how
        self.factor = 1000.0

    def forward(self, x):
        calls = []

        def scale_second(g):  # the same gradient in the norms pass, 1000x in the clipping pass
            calls.append(1)
            return g * self.factor if len(calls) == 2 else None

        def pack(t):
            return t

        def unpack(t):  # the saved activations, 1000x from their second unpacking (the clipping pass) on
            calls.append(1)
            return t * 1000.0 if len(calls) >= 3 else t

        if self.how == "saved tensors":
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                h = self.a(x)
        else:
            h = self.a(x)
        if self.how == "tensor hook":
            h.register_hook(scale_second)
        return self.b(torch.tanh(h))


def _step(how, x, factor=1000.0, **kw):
    torch.manual_seed(0)
    model = _Net(how)
    model.factor = factor
    settings = dict(noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=1.0, loss_reduction="sum")
    settings.update(kw, strategy="two-pass")
    model, opt = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), **settings)
    opt.backward(model(x).square().sum(1))
    opt.step()
    return model


X = torch.randn(1, 3, generator=torch.Generator().manual_seed(0)) * 10


@pytest.mark.parametrize("how", ["tensor hook", "saved tensors"])
@pytest.mark.parametrize("kw", [{}, dict(groups="layer-wise", max_grad_norm=[R, R])], ids=["flat", "layer-wise"])
def test_a_clipping_pass_with_other_gradients_is_refused(how, kw):
    with pytest.raises(RuntimeError, match=r"two-pass.*exceed the norms the norms pass clipped them by"):
        _step(how, X, **kw)


def test_a_refused_step_writes_no_grad():
    torch.manual_seed(0)
    model = _Net("tensor hook")
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=R,
        expected_batch_size=1.0, loss_reduction="sum", strategy="two-pass",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="two-pass"):
        opt.backward(model(X).square().sum(1))
    assert all(p.grad is None for p in model.parameters())


def test_unchanged_passes_step_within_the_bound():
    """Control: without the hooks one sample's update stays within R (the check refuses nothing)."""
    model = _step(None, X)
    norm = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
    assert 0.5 * R < float(norm) <= R * (1 + 1e-6), float(norm)  # float32 sums of a clipped gradient of norm R


def test_the_check_allows_only_rounding_sized_growth():
    """The comparison's slack (1 + 2^-16 on squared norms: bounds of the same norm from a backend that adds in
    any order) stays inside the certified R (1 + 1e-5): a clipping-pass gradient 1 + 2^-18 times the norms
    pass's steps within it; 1 + 2^-14 times (squared: 1 + 2^-13, past the slack) is refused."""
    model = _step("tensor hook", X, factor=1.0 + 2.0**-18)
    norm = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
    assert float(norm) <= R * (1 + 1e-5), float(norm)
    with pytest.raises(RuntimeError, match="two-pass"):
        _step("tensor hook", X, factor=1.0 + 2.0**-14)
