"""The guard compares a keyed hash of the watched tensors' bits, not a copy: a write of any value through an
alias the version counters miss (one low bit, -0.0 over 0.0, a NaN payload) is refused and named, in every width
and however the tensors are cut into chunks; and the guard keeps no tensor of the model's size."""

from __future__ import annotations

import itertools
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


def _layout(monkeypatch, layout: tuple[int, int]) -> None:
    row, batch = layout
    monkeypatch.setattr(guard, "_ROW", row)
    monkeypatch.setattr(guard, "_BATCH", batch)


# (halves per row at most, per batch): the defaults (a tensor per row-group, all in one batch); rows of 5 halves,
# 2 rows a batch (tensors cut across rows and batches, last rows padded); one half per row and per batch
LAYOUTS = {"default": (guard._ROW, guard._BATCH), "rows of 5": (5, 10), "one half": (1, 1)}


def _private(monkeypatch, layout: tuple[int, int]):
    _layout(monkeypatch, layout)
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B, loss_reduction="sum"
    )


def _alias(model, target):
    t = model.get_parameter(target) if "." in target else model.get_buffer(target)
    return t.detach().numpy().reshape(-1)  # a counter of its own: the hash is what sees the write


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("target", list(TARGETS))
def test_any_bit_written_through_an_alias_is_refused_and_named(monkeypatch, layout, write, target):
    model, opt = _private(monkeypatch, LAYOUTS[layout])
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
    model, _ = _private(monkeypatch, LAYOUTS["default"])
    alias = model.flags.numpy()
    model.write = lambda: alias.__setitem__(1, True)
    with pytest.raises(RuntimeError, match=r"buffer 'flags' of module '<model>' .*was written"):
        model(torch.randn(B, 4)).square().sum().backward()


def _guard(model) -> guard.ForwardGuard:
    return next(h.__self__ for h in model._forward_pre_hooks.values() if isinstance(h.__self__, guard.ForwardGuard))


def _held(g: guard.ForwardGuard, values: guard._Values) -> list[torch.Tensor]:
    """Every tensor the guard holds that is not a view of a watched tensor's memory."""
    held = list(g._views.weights.values()) + list(g._views.pads.values())
    held += [h for *_, h in values.devices] + [h for *_, b, n in values.found for h in (b, n)]
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


@pytest.mark.parametrize("layout", [(1 << 12, 1 << 22), (64, 512)])
def test_guard_holds_no_copy_of_the_model(monkeypatch, layout):
    _layout(monkeypatch, layout)
    model = _Big()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, _ = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B, loss_reduction="sum"
    )
    g = _guard(model)
    tensors = [*model.parameters(), *model.buffers()]
    halves = sum(t.numel() * t.element_size() // 2 for t in tensors)
    during = []
    model.out.register_forward_hook(lambda *a: during.append(sum(t.numel() for t in _held(g, g._before[-1].values))))
    out = model(torch.randn(B, 4)).square().sum()  # no backward yet: the check waits, holding the hashes
    later = g._pending[0][0][0]
    assert out.requires_grad and later.open()  # its backward may still come
    later()  # the second hash, made at the end of the backward (or before the next forward, a step, a release)
    values = later.values
    (plan,) = g._views.plans.values()
    width = min(layout[0], max(guard._MIN_ROW, halves // (8 * len(tensors))))
    assert plan.width == width and plan.rows <= halves / width + len(tensors), (plan, halves)
    bound = 2 * width + width + 2 * 2 * plan.rows  # weights, padding zeros, both hashes
    after = sum(t.numel() for t in _held(g, values))
    assert during and during[0] <= bound and after <= bound, (during, after, bound)
    assert after < halves / 4, (after, halves)  # bounded by the rows, not by the model
    assert len(plan.batches) == -(-plan.rows // max(1, layout[1] // width))  # full batches, across tensors
    assert all(shares for items, *_ in values.found for _, _, shares, _ in items)  # views of the tensors, no copy
    assert not values.loose


# --------------------------------------------------------------------------- the batched hash itself (`_Values`)


def _odd_tensors() -> dict[str, torch.Tensor]:
    """Watched tensors of odd sizes in every width: 1-byte ones (hashed as bytes), 2- to 16-byte ones (as 16-bit
    halves), empty ones, a non-contiguous one (its bits a copy, read anew) and one that spans many rows."""
    g = torch.Generator().manual_seed(1)
    out = {
        "bool": torch.rand(7, generator=g) < 0.5,
        "uint8": torch.randint(0, 256, (5,), generator=g, dtype=torch.uint8),
        "int8": torch.randint(-128, 128, (3,), generator=g, dtype=torch.int8),
        "fp8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "fp8e5m2": torch.randn(1, generator=g).to(torch.float8_e5m2),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(3, generator=g).bfloat16(),
        "int16": torch.randint(-(2**15), 2**15, (1,), generator=g, dtype=torch.int16),
        "f32": torch.randn(7, generator=g),
        "int32": torch.randint(-(2**31), 2**31 - 1, (3,), generator=g, dtype=torch.int32),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "int64": torch.randint(-(2**62), 2**62, (1,), generator=g, dtype=torch.int64),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "c128": torch.randn(1, generator=g, dtype=torch.complex128),
        "empty": torch.empty(0),
        "empty bool": torch.empty(0, 3, dtype=torch.bool),
        "transposed": torch.randn(3, 4, generator=g).t(),
        "long": torch.randn(53, generator=g),
    }
    return out


def _watch(tensors: dict[str, torch.Tensor]) -> list[guard._Watched]:
    m = nn.Module()
    return [guard._Watched("", m, "buffer", k, t, t._version, guard._placement(t)) for k, t in tensors.items()]


def _raw(t: torch.Tensor) -> torch.Tensor:
    """All the bytes of ``t``'s storage, an alias with a version counter of its own."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


# (halves per row, per batch): the default (the row width adapts: 16 here), rows of 5 with 2 rows a batch, rows of
# 3 with 7 halves a batch (2 rows), one half per row and batch
ODD_LAYOUTS = [(guard._ROW, guard._BATCH), (5, 10), (3, 7), (1, 1)]


@pytest.mark.parametrize("layout", ODD_LAYOUTS)
def test_every_byte_of_every_width_is_seen_and_named(monkeypatch, layout):
    """One bit flipped in any byte (first and last element, the last element of a padded row, the first and last
    batch, every dtype) makes the flag true and names that tensor; unchanged bits never do."""
    _layout(monkeypatch, layout)
    tensors = _odd_tensors()
    watched = _watch(tensors)
    views = guard._Views()
    values = guard._Values(views.renew(watched), views)
    assert not bool(values.compare()) and values.first_changed() is None
    (plan,) = views.plans.values()
    per = max(1, layout[1] // plan.width)  # rows a batch: one batch per width (bytes, halves) by default
    assert len(plan.batches) == (2 if layout == ODD_LAYOUTS[0] else len(plan.batches)) and len(plan.batches) > 1
    assert all(b.rows <= per and b.rows * b.width == sum(k for _, _, k in b.spec) for b in plan.batches)
    ((_, device_plan, *_),) = values.found
    assert device_plan is plan
    for name, t in tensors.items():
        raw = _raw(t)
        start = t.storage_offset() * t.element_size()
        span = range(start, start + t.numel() * t.element_size())
        # every byte for the default layout; the first two and last two bytes of each tensor for the others
        where = list(span) if layout == ODD_LAYOUTS[0] else sorted({*span[:2], *span[-2:]})
        for j in where:
            for bit in (1, 128) if layout == ODD_LAYOUTS[0] else (1 << (j % 8),):
                values = guard._Values(views.renew(watched), views)
                raw[j] ^= bit
                flag = values.compare()
                raw[j] ^= bit
                assert bool(flag), (name, j, bit)
                assert values.first_changed().key == name, (name, j, bit)
        assert not list(span) or where, name


def test_hash_is_the_exact_integer_sum_of_each_row(monkeypatch):
    """Every row's hash is sum_i h_i W[i, :] exactly (Python integers), with each tensor in rows of its own,
    its last row padded with zeros, at the widest row (2^20) and the largest halves and weights, where the
    float64 sums come near 2^53."""
    monkeypatch.setattr(guard, "_ROW", 1 << 20)
    monkeypatch.setattr(guard, "_MIN_ROW", 1 << 20)
    g = torch.Generator().manual_seed(2)
    big = torch.full((1 << 20,), 2**15 - 1, dtype=torch.int16)
    big[torch.randint(0, 1 << 20, (1000,), generator=g)] = -1  # the sum is odd: a rounding would show
    tensors = {"big": big, "low": torch.full((3,), -(2**15), dtype=torch.int16), "f32": torch.randn(5, generator=g)}
    views = guard._Views()
    w = torch.randint(_W_HIGH, guard._WEIGHT + 1, (1 << 20, 2), generator=g).double()
    views.weights[torch.device("cpu")] = w
    values = guard._Values(views.renew(_watch(tensors)), views)
    ((_, plan, _, hashes),) = values.devices
    assert plan.rows == 3 and plan.firsts == [0, 1, 2]
    weights = w.long().tolist()
    for row, t in enumerate(tensors.values()):
        h = guard._halves(guard._bits(t)).tolist()
        exact = [sum(x * weights[i][c] for i, x in enumerate(h)) for c in (0, 1)]
        assert hashes[row].tolist() == [float(e) for e in exact] and all(abs(e) <= 2**53 for e in exact)
        assert all(float(e) == e for e in exact)  # representable: the comparison above is of the exact sums
    assert abs(exact_big := sum(x * weights[i][0] for i, x in enumerate(big.tolist()))) > 2**52, exact_big


_W_HIGH = (1 << 18) - 1000  # weights near the top: the sums near the bound


def test_plan_is_kept_while_the_bits_are_and_made_again_for_new_storage():
    t = torch.randn(10)
    u = torch.randn(3).half()
    watched = _watch({"t": t, "u": u})
    views = guard._Views()
    guard._Values(views.renew(watched), views)
    (plan,) = views.plans.values()
    guard._Values(views.renew(watched), views)
    assert views.plans[torch.device("cpu")] is plan  # no new views, no new layout
    t.data = torch.randn(10)  # new storage (the old one freed: the layout must not read it)
    watched = _watch({"t": t, "u": u})
    values = guard._Values(views.renew(watched), views)
    assert views.plans[torch.device("cpu")] is not plan
    _raw(t)[39] ^= 1
    assert bool(values.compare()) and values.first_changed().key == "t"


def test_only_empty_tensors_hash_nothing():
    views = guard._Views()
    values = guard._Values(views.renew(_watch({"a": torch.empty(0), "b": torch.empty(2, 0).half()})), views)
    assert values.compare() is None and values.first_changed() is None and not views.weights


@pytest.mark.parametrize("batch", [guard._BATCH, 64])
def test_ops_per_hash_are_three_a_batch(monkeypatch, batch):
    """Many tensors of several widths hash in one batch per width (cat, float64 copy, mm), or one per `_BATCH`
    halves (no cat for a batch within one tensor), whatever their number; the comparison adds ne and any."""
    from bench.counters import StepCounter

    monkeypatch.setattr(guard, "_BATCH", batch)
    tensors = {f"w{i}": torch.randn(i + 1, 7) for i in range(40)}
    tensors |= {f"h{i}": torch.randn(i + 3).half() for i in range(20)}
    tensors |= {f"b{i}": torch.rand(i + 2) < 0.5 for i in range(5)}
    views = guard._Views()
    watched = _watch(tensors)
    guard._Values(views.renew(watched), views)  # the layout and weights, made once
    (plan,) = views.plans.values()
    ops = 2 * len(plan.batches) + sum(len(b.parts) > 1 for b in plan.batches)
    if batch > 64:
        assert len(plan.batches) == 2 and ops == 6  # halves, bytes
    else:
        kinds = [b.parts[0].dtype for b in plan.batches]
        ends = [a != b for a, b in itertools.pairwise(kinds)] + [True]  # a width's last batch
        assert sum(ends) == 2 and all(b.rows == batch // b.width or end for b, end in zip(plan.batches, ends))
    counter = StepCounter()
    with counter:
        values = guard._Values(views.renew(watched), views)
    assert sum(counter.kernels.values()) == ops, counter.kernels
    with counter:
        values.compare()
    assert sum(counter.kernels.values()) == 2 * ops + 2, counter.kernels


class _Odd(nn.Module):
    """A private model with watched buffers of odd sizes in 1-, 4- and 8-byte dtypes besides its float32 weights."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("odd", torch.ones(5, dtype=torch.float32).to(dtype))
        self.register_buffer("empty", torch.empty(0, dtype=dtype))
        self.write = None

    def forward(self, x):
        out = self.lin(x)
        if self.write is not None:
            self.write()
        return out


@pytest.mark.parametrize("layout", ["default", "rows of 5"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int64, torch.float8_e4m3fn])
@pytest.mark.parametrize("at", ["first", "last"])
def test_odd_buffer_written_in_forward_is_refused_and_named(monkeypatch, layout, dtype, at):
    """One bit of an odd-sized buffer's first or last element (in a padded last row) written through an alias
    during a training forward is refused, naming the buffer."""
    _layout(monkeypatch, LAYOUTS[layout])
    model = _Odd(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B, loss_reduction="sum"
    )
    model(torch.randn(B, 4)).square().sum().backward()  # an honest step trains
    opt.step()
    opt.zero_grad()
    raw = _raw(model.odd)
    j = 0 if at == "first" else len(raw) - 1
    model.write = lambda: raw.__setitem__(j, raw[j] ^ 64)
    with pytest.raises(RuntimeError, match=r"buffer 'odd' of module '<model>' .*was written"):
        model(torch.randn(B, 4)).square().sum().backward()
