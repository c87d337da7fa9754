"""torch.save writes the whole storage of every tensor it saves, the bytes outside the tensor's elements included
(a buffer sliced from a larger tensor, a tensor resized smaller keeps its old storage). A write from the batch into
those bytes, through an alias with a version counter of its own, left every watched element as it was, so the
guard's hash of the elements passed it and the batch value was released in the saved file. The guard hashes each
watched storage whole: any one bit of it is seen, and named after the tensor whose elements span it."""

from __future__ import annotations

import io
import struct

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels import guard

SECRET = 123.456  # the batch value the forward writes; found in the saved bytes when the write is released


def _raw(t: torch.Tensor) -> torch.Tensor:
    """All the bytes of ``t``'s storage, an alias with a version counter of its own."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def _sliced() -> torch.Tensor:
    return torch.zeros(1000)[:2]  # a view of 2 elements of a 4000-byte storage


def _shrunk() -> torch.Tensor:
    t = torch.zeros(64)
    t.resize_(3)  # keeps the 256-byte storage
    return t


class _Net(nn.Module):
    def __init__(self, buffer: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("b", buffer)
        self.at = 40  # a float32 slot of the storage outside the buffer's elements

    def forward(self, x):
        out = self.lin(x)
        raw = torch.empty(0).set_(self.b.untyped_storage())  # float32 over the whole storage
        raw[self.at] = x.detach()[0, 0]  # the batch, past the buffer's elements
        return out


def test_torch_save_writes_bytes_outside_a_tensors_elements():
    """The premise: a slice's saved file holds a value written past its elements."""
    b = _sliced()
    torch.empty(0).set_(b.untyped_storage())[40] = SECRET
    buf = io.BytesIO()
    torch.save({"b": b}, buf)
    assert struct.pack("<f", SECRET) in buf.getvalue()


@pytest.mark.parametrize("make", [_sliced, _shrunk], ids=["slice", "resized-smaller"])
def test_a_write_past_a_buffers_elements_is_refused(make):
    model = _Net(make())
    model, opt = dpkernels.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=4.0,
    )
    x = torch.full((4, 3), SECRET)
    with pytest.raises(RuntimeError, match=r"buffer 'b' of module '<model>' .*was written .*outside its elements"):
        model(x).square().sum().backward()
    with pytest.raises(RuntimeError, match="not released"):
        torch.save(model.state_dict(), io.BytesIO())


def _watch(tensors: dict[str, torch.Tensor]) -> list[guard._Watched]:
    m = nn.Module()
    return [guard._Watched("", m, "buffer", k, t, t._version, guard._placement(t)) for k, t in tensors.items()]


@pytest.mark.parametrize("layout", [(guard._ROW, guard._BATCH), (5, 10), (1, 1)])
def test_every_byte_of_a_shared_storage_is_seen_and_named(monkeypatch, layout):
    """Two tensors on one storage (odd sizes, one non-contiguous, with bytes of the storage in neither, an odd
    number of bytes in all) are hashed once; a bit flipped in any byte is seen, and named after the tensor whose
    elements span it (the first watched for bytes in neither)."""
    monkeypatch.setattr(guard, "_ROW", layout[0])
    monkeypatch.setattr(guard, "_BATCH", layout[1])
    base = torch.arange(37, dtype=torch.uint8)
    a = base[2:9]  # bytes 2..8
    c = base[20:32].view(3, 4).t()  # bytes 20..31, transposed
    watched = _watch({"a": a, "c": c})
    views = guard._Views()
    groups = views.renew(watched)
    assert [len(v) for v in groups.values()] == [1]  # one storage, hashed once
    raw = _raw(a)
    for j in range(37):
        values = guard._Values(views.renew(watched), views)
        raw[j] ^= 1 << (j % 8)
        flag = values.compare()
        raw[j] ^= 1 << (j % 8)
        assert bool(flag), j
        if layout[0] == 1:  # a row is one byte: the name is the tensor holding it
            assert values.first_changed().key == ("c" if 20 <= j < 32 else "a"), j
        else:
            assert values.first_changed().key in ("a", "c"), j
    values = guard._Values(views.renew(watched), views)
    assert not bool(values.compare()) and values.first_changed() is None


@pytest.mark.parametrize("change", ["resize larger", "resize smaller", "set_ other storage", "storage resized"])
def test_a_tensor_re_stored_between_forwards_is_hashed_anew(change):
    """Between two forwards the tensor's storage changes (user code): the next forward's hash reads the new
    storage, not the old view kept from the forward before (one bit flipped anywhere in it is seen)."""
    t = torch.arange(6, dtype=torch.float32)
    other = torch.zeros(1)
    views = guard._Views()
    guard._Values(views.renew(_watch({"t": t, "other": other})), views)  # a view of the old storage kept
    if change == "resize larger":
        t.resize_(40)
    elif change == "resize smaller":
        t.resize_(2)
    elif change == "set_ other storage":
        t.set_(torch.arange(9, dtype=torch.float32).untyped_storage(), 1, (3,))
    else:
        t.untyped_storage().resize_(4 * 17)
    watched = _watch({"t": t, "other": other})
    raw = _raw(t)
    for j in range(len(raw)):
        values = guard._Values(views.renew(watched), views)
        raw[j] ^= 1
        flag = values.compare()
        raw[j] ^= 1
        assert bool(flag) and values.first_changed().key == "t", (change, j)


def test_a_storage_resized_after_the_first_hash_is_refused_not_read():
    """A storage resized between the two hashes (in backward) has moved: refused and named, and its old view,
    which would read freed memory, is not hashed."""
    t = torch.arange(1000.0)
    views = guard._Views()
    values = guard._Values(views.renew(_watch({"t": t})), views)
    t.untyped_storage().resize_(0)
    assert bool(values.compare()) and values.first_changed().key == "t"


def test_a_storage_resized_in_backward_is_refused():
    class Resizer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.register_buffer("b", torch.zeros(1000))

        def forward(self, x):
            y = self.lin(x)
            y.register_hook(lambda g: (self.b.untyped_storage().resize_(8), None)[-1])
            return y

    model = Resizer()
    model, _ = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
        expected_batch_size=4.0,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"buffer 'b' of module '<model>' .*was written"):
        model(torch.randn(4, 3)).square().sum().backward()
