"""State a training forward writes where version counters do not look: a parameter's memory through an alias
with a counter of its own (``p.data``, a view's ``.data``, ``numpy()``, ``untyped_storage()``), Python
attributes set on a parameter or buffer object (pickled and deep-copied with it), a buffer or parameter
registered as None and set in forward, a parameter put in ``_parameters`` directly, a module hook registered
in forward. Each was accepted before (the step trained, the model kept the batch's value); each is now an
error naming the module and the parameter or buffer, with no gradient written. Reading ``p.data`` without
writing it trains, and torch's accessors are untouched outside a training forward."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import dpkernels

B = 4


class _Writer(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.lin = nn.Linear(4, 2)
        self.lin.weight.stat = torch.zeros(())  # set before make_private: public, and kept as it is
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("late", None)
        self.register_parameter("gain", None)

    def forward(self, x):
        m = x.detach().abs().amax()
        w = self.lin.weight
        if self.how == "p.data in place":
            w.data.add_(m)
        elif self.how == "a view's .data":
            w[0].data.copy_(m.expand(4))
        elif self.how == "p.data read, an alias kept":
            alias = w.data
            alias.mul_(1 + m)
        elif self.how == "numpy()":
            w.detach().numpy()[0, 0] += float(m)
        elif self.how == "untyped_storage()":
            torch.empty(0).set_(w.untyped_storage()).add_(m)
        elif self.how == "attribute set on a parameter":
            w.peak = m
        elif self.how == "tensor attribute of a parameter in place":
            w.stat.copy_(m)
        elif self.how == "attribute set on a buffer":
            self.scale.peak = float(m)
        elif self.how == "None buffer set":
            self.late = m.clone()
        elif self.how == "None parameter set":
            self.gain = nn.Parameter(m.clone())
        elif self.how == "_parameters written":
            self._parameters["extra"] = nn.Parameter(m.clone())
        elif self.how == "forward hook registered":
            self.lin.register_forward_hook(lambda *args, seen=m: None)
        elif self.how == "p.data read":
            assert float(w.data.abs().sum()) >= 0
        return self.lin(x) * self.scale


HOWS = {
    "p.data in place": r"parameter 'lin\.weight' of module 'lin' \(DPLinear\) was written .*alias of its memory",
    "a view's .data": r"parameter 'lin\.weight' .*was written .*alias of its memory",
    "p.data read, an alias kept": r"parameter 'lin\.weight' .*was written .*alias of its memory",
    "numpy()": r"parameter 'lin\.weight' .*was written .*alias of its memory",
    "untyped_storage()": r"parameter 'lin\.weight' .*was written .*alias of its memory",
    "attribute set on a parameter": r"module 'lin' \(DPLinear\) changed its Python state .*attribute set on parameter "
    r"'weight', added or removed",
    "tensor attribute of a parameter in place": r"held tensor 'lin\.weight\.stat' of module 'lin' \(DPLinear\) was "
    r"written .*in place",
    "attribute set on a buffer": r"module '<model>' \(_Writer\) changed .*attribute set on buffer 'scale'",
    "None buffer set": r"module '<model>' \(_Writer\) changed .*a buffer registered or set",
    "None parameter set": r"module '<model>' \(_Writer\) changed .*a parameter registered or set",
    "_parameters written": r"module '<model>' \(_Writer\) changed .*a parameter registered or set",
    "forward hook registered": r"module 'lin' \(DPLinear\) changed .*a module hook registered or removed",
}


def _private(how: str):
    model = _Writer(how)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B)


@pytest.mark.parametrize("how", list(HOWS))
def test_state_written_past_the_version_counters_is_refused(how):
    model, opt = _private(how)
    with pytest.raises(RuntimeError, match="during a DP training forward") as err:
        model(torch.randn(B, 4)).square().sum().backward()
    assert re.search(HOWS[how], str(err.value)), str(err.value)
    assert all(p.grad is None for p in model.parameters())
    assert "data" not in torch.Tensor.__dict__ and "numpy" not in torch.Tensor.__dict__  # accessors restored


def test_reading_p_data_in_a_forward_trains_and_torch_is_untouched_outside():
    model, opt = _private("p.data read")
    for _ in range(2):
        model(torch.randn(B, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.Tensor.data is torch._C.TensorBase.data and torch.Tensor.numpy is torch._C.TensorBase.numpy
    model.how = "p.data in place"  # outside DP training (eval, no autograd) the forward is the model's own
    model.eval()
    before = model.lin.weight.detach().clone()
    with torch.no_grad():
        model(torch.randn(B, 4))
    assert not torch.equal(model.lin.weight.detach(), before)
