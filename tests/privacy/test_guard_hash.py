"""The guard compares a keyed hash of the watched tensors' bits, not a copy: a write of any value through an
alias the version counters miss (one low bit, -0.0 over 0.0, a NaN payload) is refused and named, in every width
and however the tensors are cut into chunks; and the guard keeps no tensor of the model's size."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import dpkernels
from dpkernels import guard

B = 4


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)
        # watched, never read by the forward: special values in each width
        self.register_buffer("f32", torch.tensor([0.0, float("nan"), 1.0, 2.0]))
        self.register_buffer("f16", torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float16))
        self.register_buffer("f64", torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float64))
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.write = None

    def forward(self, x):
        out = self.out(self.lin(x))
        if self.write is not None:
            self.write()
        return out


def _flip_low_bit(a):
    a.view(np.uint8)[0] ^= 1  # the lowest bit of the first element (little-endian), whatever the width


def _negative_zero(a):
    a[0] = -0.0  # over 0.0: equal as a float, one bit differs


def _nan_payload(a):
    bits = a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize])
    bits[1] ^= 1  # another NaN: NaN != NaN, so only the bits tell


WRITES = {"one low bit": _flip_low_bit, "-0.0 over 0.0": _negative_zero, "NaN payload": _nan_payload}
TARGETS = {
    "f32": r"buffer 'f32' of module '<model>'",
    "f16": r"buffer 'f16' of module '<model>'",
    "f64": r"buffer 'f64' of module '<model>'",
    "lin.weight": r"parameter 'lin\.weight' of module 'lin' \(DPLinear\)",
    "out.bias": r"parameter 'out\.bias' of module 'out' \(DPLinear\)",
}


def _private(monkeypatch, chunk: int):
    monkeypatch.setattr(guard, "_CHUNK", chunk)
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B, loss_reduction="sum"
    )


def _alias(model, target):
    t = model.get_parameter(target) if "." in target else model.get_buffer(target)
    return t.detach().numpy().reshape(-1)  # a counter of its own: the hash is what sees the write


# 2^20: every group in one chunk, the tensors named by their prefix sums; 5: tensors cut across chunks; 1: one
# half per chunk
@pytest.mark.parametrize("chunk", [1 << 20, 5, 1])
@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("target", list(TARGETS))
def test_any_bit_written_through_an_alias_is_refused_and_named(monkeypatch, chunk, write, target):
    model, opt = _private(monkeypatch, chunk)
    model(torch.randn(B, 4)).square().sum().backward()  # an honest step trains
    opt.step()
    opt.zero_grad()
    if write != "one low bit" and "." in target:  # parameters hold no special values: put one there first
        with torch.no_grad():
            p = model.get_parameter(target).view(-1)
            p[0], p[1] = 0.0, float("nan")
    alias = _alias(model, target)
    model.write = lambda: WRITES[write](alias)
    with pytest.raises(RuntimeError, match="during a DP training forward") as err:
        model(torch.randn(B, 4)).square().sum().backward()
    assert re.search(TARGETS[target] + r".* was written .*alias of its memory", str(err.value)), str(err.value)


def test_bool_buffer_flip_is_refused(monkeypatch):
    model, _ = _private(monkeypatch, 1 << 20)
    alias = model.flags.numpy()
    model.write = lambda: alias.__setitem__(1, True)
    with pytest.raises(RuntimeError, match=r"buffer 'flags' of module '<model>' .*was written"):
        model(torch.randn(B, 4)).square().sum().backward()


def _guard(model) -> guard.ForwardGuard:
    return next(h.__self__ for h in model._forward_pre_hooks.values() if isinstance(h.__self__, guard.ForwardGuard))


def _held(g: guard.ForwardGuard, values: guard._Values) -> list[torch.Tensor]:
    """Every tensor the guard holds that is not a view of a watched tensor's memory."""
    held = list(g._views.weights.values())
    held += [ends for _, plan in g._views.plans.values() for _, ends in plan if ends is not None]
    held += [h for _, _, h in values.groups] + [h for *_, b, n in values.found for h in (b, n)]
    held += [c for _, c in values.loose]
    return held


class _Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 64)
        self.big = nn.Linear(64, 64)
        self.out = nn.Linear(64, 2)
        self.register_buffer("scale", torch.ones(64, dtype=torch.float16))

    def forward(self, x):
        return self.out(self.big(self.lin(x)) * self.scale)


@pytest.mark.parametrize("chunk", [1 << 20, 512])
def test_guard_holds_no_copy_of_the_model(monkeypatch, chunk):
    monkeypatch.setattr(guard, "_CHUNK", chunk)
    model = _Big()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, _ = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B, loss_reduction="sum"
    )
    g = _guard(model)
    halves = sum(t.numel() * t.element_size() // 2 for t in [*model.parameters(), *model.buffers()])
    during = []
    model.out.register_forward_hook(lambda *a: during.append(sum(t.numel() for t in _held(g, g._before[-1].values))))
    model(torch.randn(B, 4)).square().sum()  # no backward: the check waits, holding the hashes
    values = g._pending[0][0][1].args[1]
    segments = sum(len(segs) for _, plan in g._views.plans.values() for segs, _ in plan)
    after = sum(t.numel() for t in _held(g, values))
    bound = 2 * min(chunk, halves) + 2 * 2 * segments + segments  # weights, both hashes, the segment ends
    assert during and during[0] <= bound and after <= bound, (during, after, bound)
    if chunk < halves:
        assert after < halves / 4, (after, halves)  # bounded by the chunk, not by the model
    assert all(shares for items, *_ in values.found for _, _, shares, _ in items)  # views of the tensors, no copy
    assert not values.loose
