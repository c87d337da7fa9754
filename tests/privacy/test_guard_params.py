"""Parameters written in a training forward through routes no version counter sees: an alias of their memory
taken before the forward and kept in a global, a closure or an object on the module (``.data``, ``numpy()``,
DLPack), a raw pointer (``data_ptr()`` and ctypes), a forward hook registered after make_private; frozen
parameters too (released with the model). Each was accepted before (the step trained, the model kept the
batch's value); each is now an error naming the module and the parameter, with no gradient written. A
forward whose backward never comes is read before the model's state is released (state_dict, torch.save,
pickle, deepcopy) or at the next forward, and a model a forward wrote stays refused until its state is
loaded back. Normal training, the optimizer's step and frozen parameters left alone are not refused."""

from __future__ import annotations

import copy
import ctypes
import io
import pickle
import re
import types

import pytest
import torch
from torch import nn

import dpkernels

B = 4


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.frozen = nn.Linear(3, 2)
        self.frozen.requires_grad_(False)
        self.write = None  # (model, m) -> None: what the forward writes, m a value of the batch

    def forward(self, x):
        out = self.frozen(self.lin(x))
        if self.write is not None:
            self.write(self, x.detach().abs().amax())
        return out


_GLOBAL: dict = {}


def _numpy_global(model):
    _GLOBAL["w"] = model.lin.weight.detach().numpy()  # taken before the forward, kept in a global

    def write(mod, m):
        _GLOBAL["w"][0, 0] += float(m)

    return write


def _data_in_init(model):
    model.cfg = types.SimpleNamespace(w=model.lin.weight.data)  # an object: compared by identity only
    return lambda mod, m: mod.cfg.w.add_(m)


def _data_attribute(model):
    model.w_alias = model.lin.weight.data  # as `self.w_alias = self.weight.data` in __init__
    return lambda mod, m: mod.w_alias.add_(m)


def _closure(model):
    alias = model.lin.weight.data
    return lambda mod, m: alias.mul_(1 + m)


def _dlpack(model):
    alias = torch.utils.dlpack.from_dlpack(model.lin.weight.detach().__dlpack__())
    return lambda mod, m: alias[1].add_(m)


def _ctypes(model):
    address = model.lin.weight.data_ptr()  # a raw pointer, taken before the forward

    def write(mod, m):
        value = (m + 1).reshape(1).float().contiguous()
        ctypes.memmove(address, value.data_ptr(), 4)

    return write


def _root_writer(mod, args, out):  # module level: the model pickles with it
    mod.lin.weight.data.add_(out.detach().mean())


def _sub_writer(mod, args, out):
    with torch.no_grad():
        mod.weight.add_(out.detach().mean())


def _root_hook(model):
    model.register_forward_hook(_root_writer)


def _sub_hook_no_grad(model):
    model.lin.register_forward_hook(_sub_writer)


def _no_grad_copy(model):
    def write(mod, m):
        with torch.no_grad():
            mod.lin.bias.copy_(m.expand(3))

    return write


def _frozen_data(model):
    return lambda mod, m: mod.frozen.weight.data.mul_(1 + m)


def _frozen_numpy(model):
    alias = model.frozen.bias.numpy()  # frozen: numpy() needs no detach
    return lambda mod, m: alias.__setitem__(0, float(m))


LIN_W = r"parameter 'lin\.weight' of module 'lin' \(DPLinear\) was written"
ALIAS = r"alias of its memory .*taken before or during the forward"
ROUTES = {
    "numpy alias in a global": (_numpy_global, LIN_W + ".*" + ALIAS),
    ".data alias in an object on the module": (_data_in_init, LIN_W + ".*" + ALIAS),
    ".data alias as a module attribute": (_data_attribute, r"(attribute 'w_alias'|parameter 'lin\.weight').*written"),
    ".data alias in a closure": (_closure, LIN_W + ".*" + ALIAS),
    "DLPack alias": (_dlpack, LIN_W + ".*" + ALIAS),
    "ctypes through data_ptr()": (_ctypes, LIN_W + ".*" + ALIAS),
    "root forward hook registered after make_private": (None, LIN_W + ".*" + ALIAS),
    "submodule forward hook, no_grad in place": (None, LIN_W + r".*\(in place\)"),
    "no_grad copy_ in forward": (_no_grad_copy, r"parameter 'lin\.bias' of module 'lin' .*\(in place\)"),
    "frozen parameter through .data": (_frozen_data, r"parameter 'frozen\.weight' of module 'frozen' .*" + ALIAS),
    "frozen parameter through numpy": (_frozen_numpy, r"parameter 'frozen\.bias' of module 'frozen' .*" + ALIAS),
}
HOOKS = {
    "root forward hook registered after make_private": _root_hook,
    "submodule forward hook, no_grad in place": _sub_hook_no_grad,
}


def _private(route: str | None = None, before: bool = True):
    torch.manual_seed(0)
    model = _Net()
    setup = ROUTES[route][0] if route is not None else None
    if setup is not None and before:
        model.write = setup(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B)
    if setup is not None and not before:
        model.write = setup(model)
    if route in HOOKS:
        HOOKS[route](model)
    return model, opt


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("route", list(ROUTES))
def test_parameter_written_in_forward_is_refused_and_not_released(route):
    model, opt = _private(route)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="during a DP training forward") as err:
        model(torch.randn(B, 4)).square().sum().backward()
    assert re.search(ROUTES[route][1], str(err.value)), str(err.value)
    assert "let the optimizer alone change it" in str(err.value)  # says what to do
    assert all(p.grad is None for p in model.parameters())
    for release in (model.state_dict, model.lin.state_dict, lambda: _saved(model), lambda: copy.deepcopy(model)):
        with pytest.raises(RuntimeError, match="this model's state is not released"):
            release()
    model.write = None
    for m in model.modules():
        for k in [k for k, h in m._forward_hooks.items() if h in (_root_writer, _sub_writer)]:
            del m._forward_hooks[k]
    model.load_state_dict(saved)  # the state from before: released again, and trains
    assert model.state_dict().keys() == saved.keys()
    model(torch.randn(B, 4)).square().sum().backward()
    opt.step()


@pytest.mark.parametrize("route", ["numpy alias in a global", ".data alias in a closure", "ctypes through data_ptr()"])
def test_alias_taken_after_make_private_is_refused(route):
    model, _ = _private(route, before=False)
    with pytest.raises(RuntimeError, match=ROUTES[route][1]):
        model(torch.randn(B, 4)).square().sum().backward()


RELEASES = {
    "state_dict": lambda m: m.state_dict(),
    "a layer's state_dict": lambda m: m.frozen.state_dict(),
    "torch.save(model)": _saved,
    "torch.save(layer)": lambda m: _saved(m.lin),
    "pickle": pickle.dumps,
    "deepcopy": copy.deepcopy,
    "next forward": lambda m: m(torch.randn(B, 4)),
}


@pytest.mark.parametrize("release", list(RELEASES))
def test_forward_without_backward_is_read_before_release(release):
    """A training forward (grad enabled) defers its value check to the backward's one host read; with no
    backward, the check is read before anything leaves the model, and at the next forward."""
    model, _ = _private("numpy alias in a global")
    model(torch.randn(B, 4))  # no backward follows
    model.write = None
    with pytest.raises(RuntimeError, match=LIN_W + ".*" + ALIAS):
        RELEASES[release](model)
    with pytest.raises(RuntimeError, match="this model's state is not released"):  # and stays refused
        model.state_dict()


def test_make_private_again_keeps_a_waiting_check():
    """make_private again after a forward with no backward: the earlier engine's waiting check is read, and the
    model it wrote is not released."""
    model, opt = _private("numpy alias in a global")
    model(torch.randn(B, 4))
    model.write = None
    model, opt = dpkernels.make_private(
        model, opt.original_optimizer, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B
    )
    with pytest.raises(RuntimeError, match="this model's state is not released .*" + LIN_W):
        model.state_dict()


_SEEN: list[float] = []


def _reader(mod, m):  # module level, as the hook below: the model pickles with them
    _SEEN.append(float(_GLOBAL["read"][0, 0]))


def _read_hook(mod, args, out):
    _SEEN.append(float(out.detach().sum()))


def test_training_frozen_parameters_and_aliases_read_are_not_refused():
    """Steps with Adam (the optimizer writes the parameters in place, outside the forward), a frozen layer, an
    alias taken before the forward and read in it, a forward hook that reads, a forward with no backward and the
    releases after it: no refusal; the frozen parameters are bit for bit what they were."""
    torch.manual_seed(0)
    model = _Net()
    _GLOBAL["read"] = model.lin.weight.detach().numpy()
    _SEEN.clear()
    model.write = _reader
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B)
    model.lin.register_forward_hook(_read_hook)
    frozen = {k: v.clone() for k, v in model.frozen.state_dict().items()}
    start = model.lin.weight.detach().clone()
    for _ in range(3):
        model(torch.randn(B, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model.lin.weight.detach(), start)
    model(torch.randn(B, 4))  # a training forward with no backward, writing nothing
    state = model.state_dict()
    _saved(model)
    copy.deepcopy(model)
    model(torch.randn(B, 4)).square().sum().backward()
    opt.step()
    assert all(torch.equal(state[f"frozen.{k}"], v) for k, v in frozen.items())
    assert len(_SEEN) == 10


class _Strided(nn.Module):
    """A frozen parameter that is not contiguous: its bits are a copy, read again at each comparison."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.mix = nn.Parameter(torch.randn(2, 3).t(), requires_grad=False)
        self.alias = None

    def forward(self, x):
        if self.alias is not None:  # an object: compared by identity only
            self.alias.t.add_(x.detach().abs().amax())
        return self.lin(x) @ self.mix


def test_non_contiguous_parameter_trains_and_its_write_is_refused():
    torch.manual_seed(0)
    model = _Strided()
    assert not model.mix.is_contiguous()
    opt = torch.optim.SGD(model.lin.parameters(), lr=0.1)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B)
    for _ in range(2):
        model(torch.randn(B, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    model.alias = types.SimpleNamespace(t=model.mix.data[1])
    with pytest.raises(RuntimeError, match=r"parameter 'mix' of module '<model>' \(_Strided\) was written .*" + ALIAS):
        model(torch.randn(B, 4)).square().sum().backward()


def _prepended_writer(mod, args):
    mod.lin.weight.data.add_(args[0].detach().abs().amax())


def test_pre_hook_registered_ahead_of_the_guard_is_refused():
    """A root pre-hook registered with prepend=True after make_private runs before the guard's copy: what it
    writes would not be seen, so the forward is refused before the model runs; registered without prepend it
    runs inside the compared span and its write is refused by name."""
    model, opt = _private()
    handle = model.register_forward_pre_hook(_prepended_writer, prepend=True)
    before = model.lin.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"forward pre-hook \(_prepended_writer\) was registered .*ahead of"):
        model(torch.randn(B, 4))
    assert not torch.equal(model.lin.weight.detach(), before)  # it ran, unseen: hence the refusal
    handle.remove()
    model(torch.randn(B, 4)).square().sum().backward()  # the guard's records stay paired
    opt.step()
    opt.zero_grad()
    model.register_forward_pre_hook(_prepended_writer)
    with pytest.raises(RuntimeError, match=LIN_W + ".*" + ALIAS):
        model(torch.randn(B, 4)).square().sum().backward()


class _SwappedWriter(nn.Linear):
    """A frozen layer set on the model after make_private whose forward writes a batch value into its weight."""

    def forward(self, x):
        self.weight.data[0, 0] = float(x.detach().abs().amax())
        return super().forward(x)


def test_module_set_after_make_private_is_refused_and_trains_after_make_private_again():
    model, opt = _private()
    writer = _SwappedWriter(3, 2).requires_grad_(False)
    before = writer.weight.detach().clone()
    model.frozen = writer  # accepted before: the batch's value trained into it and state_dict released it
    with pytest.raises(RuntimeError, match="'frozen' .*set on the model after make_private"):
        model(torch.randn(B, 4)).square().sum().backward()
    assert torch.equal(writer.weight, before)  # refused before the forward ran
    assert all(p.grad is None for p in model.parameters())
    model.frozen = nn.Linear(3, 2).requires_grad_(False)
    model, opt = dpkernels.make_private(
        model, opt.original_optimizer, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B
    )
    model(torch.randn(B, 4)).square().sum().backward()
    opt.step()
