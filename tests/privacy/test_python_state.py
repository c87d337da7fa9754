"""A training forward may not change a module's Python state: it is pickled with the model (torch.save,
deepcopy), and a value written from the batch there is learned outside the gradient, with no clipping and no
noise. Each way below went unseen before (the forward guard compared only tensors it already knew): a new
attribute on the first forward, a list/dict of tensors appended to or written in place, a number set from the
batch, a submodule added. Each is an error naming the module, with no gradient written; the model's own
containers (an RNN's weight lists) and an unchanged forward are accepted."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch import nn

import dpkernels

B = 4


class _Keeper(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.lin = nn.Linear(4, 2)
        self.history = [torch.zeros(4)]
        self.table = {"peak": torch.zeros(4)}
        self.seen = 0.0

    def forward(self, x):
        m = x.detach().abs().amax(0)
        if self.how == "new attribute":
            self.peak = m
        elif self.how == "list.append":
            self.history.append(m)
        elif self.how == "list tensor in place":
            self.history[0].copy_(m)
        elif self.how == "dict set":
            self.table["other"] = m
        elif self.how == "dict tensor in place":
            self.table["peak"].copy_(m)
        elif self.how == "number":
            self.seen = float(m.max())
        elif self.how == "submodule":
            extra = nn.Module()
            extra.register_buffer("peak", m.clone())
            self.extra = extra
        elif self.how == "child's submodule":
            self.lin.extra = nn.Identity()
        return self.lin(x)


HOWS = {
    "new attribute": r"attributes \['peak'\] added",
    "list.append": r"container",
    "list tensor in place": r"held tensor 'history\[0\]'.*in place",
    "dict set": r"container",
    "dict tensor in place": r"held tensor 'table\[0\]'.*in place",
    "number": r"Python attribute",
    "submodule": r"submodule added",
    "child's submodule": r"module 'lin' \(DPLinear\).*submodule added",
}


def _private(model: nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B)


@pytest.mark.parametrize("how", list(HOWS))
def test_python_state_written_in_a_training_forward_is_refused(how):
    model, opt = _private(_Keeper(how))
    said = HOWS[how]
    with pytest.raises(RuntimeError, match="during a DP training forward") as err:
        model(torch.randn(B, 4)).square().sum().backward()
    assert re.search(said, str(err.value)), str(err.value)
    assert all(p.grad is None for p in model.parameters())
    model.how = "nothing"  # restore: the model trains, and pickles with nothing from the batch
    model.history, model.table, model.seen = [torch.zeros(4)], {"peak": torch.zeros(4)}, 0.0
    for k in ("peak", "extra"):
        model.__dict__.pop(k, None), model._modules.pop(k, None), model.lin._modules.pop(k, None)
    model(torch.randn(B, 4)).square().sum().backward()
    opt.step()
    model.eval()  # eval mode without autograd recording: not a training forward, allowed
    model.how = how
    with torch.no_grad():
        model(torch.randn(B, 4))


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.names = ["a", "b"]  # public constants in a container: read, never written
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_an_rnn_and_unchanged_containers_train_and_pickle():
    model, opt = _private(_Seq())
    for _ in range(2):
        model(torch.randn(B, 5, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    torch.save(copy.deepcopy(model), io.BytesIO())
