"""Forward hooks on a private model: what each training forward may and may not do.

- Its input tensors are recorded while it runs (`model_inputs`): a 1-D ids tensor that is one of them
  (or a view of one) holds one id per sample; one made inside the forward (nanoGPT's
  ``wpe(torch.arange(T))``) holds positions shared by every sample, which nothing can tell from the
  batch when T equals the batch size. `dpkernels.nn.DPEmbedding` refuses the latter.
- No module state may be written during a training forward: buffers, tensors kept as plain module attributes
  (``self.stats = torch.zeros(4)``, not registered) and parameters, trainable and frozen. Such state is
  released with the model, and state written from the batch (a quantization observer's min/max, running
  statistics, a parameter nudged in forward) is learned outside the gradient, without clipping or noise.
  Around the forward, each such tensor's identity, version counter and storage (address, offset, shape) are
  compared, which catches in-place ops (``torch.no_grad()`` ones too), reassignment and ``t.data = x``: one
  Python read each, no host sync. A write through an alias with a version counter of its own bumps none:
  ``t.data``, ``numpy()``, ``untyped_storage()``, DLPack, taken during the forward or before it and kept
  anywhere (a global, a closure, an object), or a raw pointer (``data_ptr()`` and ctypes). So every watched tensor's
  bits are also compared, through a keyed hash (`_Values`): before the forward, per row of up to 2^12 16-bit halves of
  its storage's bits (every byte torch.save writes with it, those outside its elements too; a row holds one
  storage's, shared by its views), a pair of dot products with the guard's secret random integer weights, exact in
  float64, many rows and tensors at once (3 ops per batch of <= 2^22 halves, 8 MiB of state); after it (the second
  hash, below) the same hashes, and ``ne``, ``any`` give a flag (the first differing row names the tensor). No copy of
  the model: one batch's temporaries at a time (<= 40 MiB), the hashes (16 bytes a row), and the weights (<= 64 KiB
  per device). A write that changes one 16-bit half (one low bit, -0.0 over 0.0, a NaN payload) is always seen; writes
  to several halves that cancel in the hash are missed with probability <= 2^-36 when not chosen knowing the weights.
  The second hash is made at the end of the forward's backward pass (marked by hooks on the forward's output tensors),
  so writes during backward (a tensor hook or an autograd Function the forward set up, two-pass's second backward) are
  compared too, and its flag is read with the engine's one host read there (at once for a forward under
  ``torch.no_grad()`` or whose output needs no gradient). A forward whose backward has not come is hashed before
  ``optimizer.step()`` and the root's ``load_state_dict`` change the state, and read before the next forward (kept
  open while its output is alive and nothing hashed it), before ``make_private`` again points the guard at a new
  engine, and before any of the model's modules releases its state (``state_dict``, pickling: ``torch.save``,
  ``deepcopy``), through a state_dict pre-hook on each module that also pickles with it. After a refusal the model's
  state is not released (state_dict, pickling) until the root's ``load_state_dict`` loads every key back. The guard's
  post-hook is kept last among the model's forward hooks, so a forward hook registered after make_private runs inside
  the compared span, and a pre-hook registered ahead of the guard's (``prepend=True`` after make_private) is refused.
  Not seen: writes before the guard's pre-hook by a global module pre-hook, or after the second hash (by an autograd
  callback queued during backward, which runs after the engine's; in a backward after the model's state was released
  between the forward and it); a write undone before the second hash; FSDP2's unsharded parameters (their shards are
  watched).
- Nor may a training forward change a module's other Python state, which is pickled with the model
  (``torch.save(model)``, ``copy.deepcopy``): a new attribute (``self.peak = x.amax()``: there was
  nothing to compare on the first forward), a submodule added, a parameter or buffer registered or set
  from None (``_parameters`` / ``_buffers`` written directly too), a module hook registered or removed,
  a number or string replaced (``self.seen = float(x.max())``), a list/tuple/dict changed or a tensor in
  it written (``self.history.append(x.detach())``), or an attribute set on a parameter, buffer or tensor
  attribute object (``p.peak = x.amax()``: a tensor's ``__dict__`` is pickled with it). Containers are
  flattened (``torch.utils._pytree``); any other object is compared by identity, so state hidden inside
  one (a config object's field), in a global or in a closure is not seen, nor are ``p.grad`` and the
  optimizer's state.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import operator
import os
import threading
import weakref
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_leaves

_local = threading.local()


def model_inputs() -> frozenset[int] | None:
    """Storage addresses of the input tensors of the private model whose forward is running in this thread
    (the innermost one); None outside any. Computed on demand: most forwards never ask."""
    stack = getattr(_local, "inputs", None)
    if not stack:
        return None
    args, kwargs = stack[-1]
    return frozenset(storage_of(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor))


def storage_of(t: Tensor) -> int:
    return torch._C.TensorBase.untyped_storage(t).data_ptr()


def _weight_only(m: nn.Module) -> frozenset[str]:
    """Buffers and tensor attributes of ``m`` that its forward writes from its weights alone, never from the
    batch: spectral normalisation's power-iteration vectors (a function of the private weights, so private
    too), and the weight that the old spectral_norm / weight_norm hooks recompute as a plain attribute."""
    from torch.nn.utils.parametrizations import _SpectralNorm
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    hooks = list(m._forward_pre_hooks.values())
    names = {f"{h.name}_{s}" for h in hooks if isinstance(h, SpectralNorm) for s in "uv"}
    names |= {
        h.name for h in hooks if isinstance(h, (SpectralNorm, WeightNorm))
    }  # the weight recomputed as an attribute
    if isinstance(m, _SpectralNorm):
        names |= {"_u", "_v"}
    return frozenset(names)


class _Watched(NamedTuple):
    """One tensor of module state as it was before the forward."""

    module_name: str
    module: nn.Module
    kind: str  # "buffer", "attribute", "held tensor" (in a container attribute), "parameter" or "sharded parameter"
    key: str
    tensor: Tensor
    version: int
    where: tuple[int, int, tuple[int, ...]]  # storage address, offset, shape

    def describe(self) -> str:
        where = f"{self.module_name}.{self.key}" if self.module_name else self.key
        return f"{self.kind} {where!r} of module {self.module_name or '<model>'!r} ({type(self.module).__name__})"

    def current(self) -> Any:
        if self.kind == "buffer":
            return self.module._buffers.get(self.key)
        if self.kind in ("parameter", "sharded parameter"):
            return self.module._parameters.get(self.key)
        if self.kind == "held tensor":  # in a container: its identity is in the module's fingerprint
            return self.tensor
        return self.module.__dict__.get(self.key)


def _placement(t: Tensor) -> tuple[int, int, tuple[int, ...]]:
    t = getattr(t, "_local_tensor", t)  # a DTensor's storage is its local shard's
    return (_raw_storage(t).data_ptr(), int(t.storage_offset()), tuple(t.shape))


def _changed(now: Tensor, before: Tensor) -> Tensor:
    """A 0-d bool tensor: any value of ``now`` differs from ``before`` (NaN equal to NaN), on the device."""
    diff = now != before
    if now.is_floating_point() or now.is_complex():
        diff = diff & ~(now.isnan() & before.isnan())
    return diff.any()


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}


def _bits(t: Tensor) -> Tensor | None:
    """``t``'s values as a flat tensor of integers of their width (int32 for float32, ...; a view where ``t`` is
    contiguous), None where torch has no such view (sparse, quantized, a tensor subclass): compared bit for bit,
    a write is seen whatever it writes (-0.0 over 0.0, NaN payloads)."""
    if type(t) not in (Tensor, nn.Parameter):  # a subclass (DTensor): cloned, compared by its own ops
        return None
    d = t.detach()
    try:
        return d.view(_INT_OF_SIZE[d.element_size()]).reshape(-1)
    except (RuntimeError, TypeError, NotImplementedError, KeyError):
        try:
            return d.reshape(-1).view(torch.uint8)
        except (RuntimeError, TypeError, NotImplementedError):
            return None


def _halves(b: Tensor) -> Tensor:
    """``b``'s bits (a flat `_bits` view) as 16-bit signed integers, a view (1-byte ones as they are)."""
    return b if b.element_size() == 1 else b.view(torch.int16)


def _storage_key(t: Tensor | None) -> tuple | None:
    """(device, address, bytes) of a plain tensor's storage; None for anything else (a subclass: DTensor)."""
    if t is None or type(t) not in (Tensor, nn.Parameter) or t.is_sparse or t.is_quantized:
        return None
    try:
        st = _raw_storage(t)
        return (t.device, st.data_ptr(), st.nbytes())
    except (RuntimeError, NotImplementedError):
        return None


def _storage_bits(t: Tensor) -> Tensor | None:
    """Every byte of ``t``'s storage as a flat integer view (int16 for an even number of bytes, else uint8), None
    where there is none (`_storage_key`). ``torch.save`` writes the whole storage of each tensor it saves, bytes
    outside the tensor's elements included (a slice of a larger tensor, a tensor resized smaller), so a write
    there from the batch would be released with the model: the guard hashes the storage, not the elements."""
    if _storage_key(t) is None:
        return None
    try:
        with torch.no_grad():
            b = torch.empty(0, dtype=torch.uint8, device=t.device).set_(_raw_storage(t))
        return b.view(torch.int16) if b.numel() % 2 == 0 else b
    except (RuntimeError, TypeError, NotImplementedError):
        return None


class _Batch(NamedTuple):
    """One batched op of a device's hash: rows [row, row + rows) of ``width`` halves each, from ``parts`` (views
    of the tensors' halves and of the padding zeros) in the order of ``spec``: (item, start, length), item -1
    for padding."""

    row: int
    rows: int
    width: int
    spec: list[tuple[int, int, int]]
    parts: list[Tensor]
    stale: bool  # holds bits that are no view of their tensor (a copy): read anew after the forward


class _Plan(NamedTuple):
    """A device's hash layout (`_Views.plan`): made for the `_bits` of its tensors (``bits``, by identity)."""

    bits: tuple[Tensor, ...]
    rows: int
    firsts: list[int]  # the first row of each tensor with bits, ascending
    owners: list[int]  # the item whose rows start there
    batches: list[_Batch]
    width: int  # the widest row


class _Views:
    """The bits of each watched tensor's whole storage (`_storage_bits`: every byte ``torch.save`` writes with the
    tensor, those outside its elements too), a view kept from one forward to the next while the storage keeps its
    address and size: a view made again would read the same memory (the one kept holds that storage, so no
    other can take its address). Tensors sharing a storage (views, tied or sliced weights) are hashed once. A
    tensor with no such view (not a plain tensor) has its own bits (`_bits`), read anew at each comparison when
    they are a copy. Also the guard's secret hash weights per device (`table`), the zeros that pad a storage's
    last row, and each device's hash layout (`plan`), made again when its storages change."""

    def __init__(self) -> None:
        self.kept: dict[Any, tuple[Tensor, Tensor | None, bool, Any, int]] = {}
        self.sharing: dict[int, list[_Watched]] = {}  # id(bits) -> the watched tensors on that storage, in order
        self.weights: dict[torch.device, Tensor] = {}
        self.pads: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.plans: dict[torch.device, _Plan] = {}
        self.generator: torch.Generator | None = None

    def renew(self, watched: list[_Watched]) -> dict[Any, list[tuple[_Watched, Tensor | None, bool, int]]]:
        """(watched, bits, whether they are a view of its memory, their number of 16-bit halves) once per storage
        (`_storage_bits`: tensors sharing one, a tied parameter watched under each module holding it, are
        compared once; the first watched stands for them, `sharing` lists them all), or once per tensor with no
        storage view, grouped by the bits' device (None: no bits), in the order watched; the views and plans of
        storages no longer watched are let go."""
        kept, self.kept = self.kept, {}
        self.sharing = {}
        groups: dict[Any, list[tuple[_Watched, Tensor | None, bool, int]]] = {}
        seen: set[int] = set()
        for w in watched:
            t = w.tensor
            if id(t) in seen:
                continue
            seen.add(id(t))
            key: Any = _storage_key(t)
            if key is not None and key in self.kept:
                self.sharing[id(self.kept[key][1])].append(w)
                continue
            if key is None:  # no storage view: its own bits, a copy read anew (or a clone compared by value)
                key = ("tensor", id(t))
            old = kept.get(key)
            if old is None or not old[2] or _storage_key(old[1]) != key:
                b = _storage_bits(t)
                if b is None:
                    b = _bits(t)  # a copy where t is not contiguous: made again each time
                    shares = b is not None and _raw_storage(b).data_ptr() == w.where[0]
                else:
                    shares = True
                group = None if b is None else b.device
                old = (t, b, shares, group, 0 if b is None else _halves(b).numel())
            self.kept[key] = old
            self.sharing[id(old[1])] = [w]
            groups.setdefault(old[3], []).append((w, old[1], old[2], old[4]))
        for device in [d for d in self.plans if d not in groups]:
            del self.plans[device]
        return groups

    def plan(self, device: torch.device, items: list[tuple[_Watched, Tensor | None, bool, int]]) -> _Plan:
        """The device's hash layout (see `_Values`): per width of halves (2 bytes; 1 for 1-byte tensors), each
        tensor's halves in rows of ``width`` halves, its last row padded with zeros, so that a row holds one
        tensor's halves; ``width`` = the group's halves / (8 x its tensors), in [`_MIN_ROW`, `_ROW`] (the
        padding is < 1/8 of the group, or `_MIN_ROW` halves a tensor); the rows cut into batches of <= `_BATCH`
        halves (at least one row), a tensor spanning several where it is large."""
        bits = tuple(b for _, b, _, _ in items if b is not None)  # all: this device's items have bits
        cached = self.plans.get(device)
        if cached is not None and len(cached.bits) == len(bits) and all(map(operator.is_, cached.bits, bits)):
            return cached
        halves = [_halves(b) for b in bits]
        kinds: dict[torch.dtype, list[int]] = {}
        for i, h in enumerate(halves):
            if h.numel():  # an empty tensor has no bits to write
                kinds.setdefault(h.dtype, []).append(i)
        batches: list[_Batch] = []
        firsts: list[int] = []
        owners: list[int] = []
        row = widest = 0
        for dtype, idx in kinds.items():
            sizes = [halves[i].numel() for i in idx]
            width = min(_ROW, max(_MIN_ROW, sum(sizes) // (8 * len(idx))))
            widest = max(widest, width)
            per = max(1, _BATCH // width)  # rows per batch
            zeros = self.pad(device, dtype, width)
            first, spec, parts, stale = row, [], [], False
            for i, n in zip(idx, sizes, strict=True):
                firsts.append(row)
                owners.append(i)
                s = 0
                while s < n:
                    k = min(n - s, (first + per - row) * width)  # the rest of the tensor, or of the batch
                    rows = -(-k // width)
                    spec.append((i, s, k))
                    parts.append(halves[i].narrow(0, s, k))
                    if rows * width > k:  # the tensor's last row
                        spec.append((-1, 0, rows * width - k))
                        parts.append(zeros[: rows * width - k])
                    stale = stale or not items[i][2]
                    s, row = s + k, row + rows
                    if row == first + per:
                        batches.append(_Batch(first, per, width, spec, parts, stale))
                        first, spec, parts, stale = row, [], [], False
            if spec:
                batches.append(_Batch(first, row - first, width, spec, parts, stale))
        plan = _Plan(bits, row, firsts, owners, batches, widest)
        if batches:
            self.table(device, widest)
        self.plans[device] = plan
        return plan

    def pad(self, device: torch.device, dtype: torch.dtype, n: int) -> Tensor:
        """At least ``n`` zeros of ``dtype`` on ``device`` (made once; a row's padding is a view of them)."""
        z = self.pads.get((device, dtype))
        if z is None or len(z) < n:
            z = self.pads[(device, dtype)] = torch.zeros(n, dtype=dtype, device=device)
        return z

    def table(self, device: torch.device, n: int) -> Tensor:
        """At least ``n`` rows of the secret weights on ``device``: (rows, 2) float64 integers drawn uniformly from
        [1, 2^18] once per guard (a generator seeded from os.urandom), grown by drawing more rows (the rows
        already drawn are kept, so a forward's pre- and post-hook use the same)."""
        w = self.weights.get(device)
        if w is not None and len(w) >= n:
            return w
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        have = 0 if w is None else len(w)
        more = torch.randint(1, _WEIGHT + 1, (n - have, 2), generator=self.generator, dtype=torch.float64)
        w = more.to(device) if w is None else torch.cat([w, more.to(device)])
        self.weights[device] = w
        return w


_ROW = 1 << 12  # halves per hashed row at most (a row's hash is exact for <= 2^20; padding <= _ROW per tensor)
_MIN_ROW = 1 << 4
_BATCH = 1 << 22  # halves hashed by one batched op at most: the temporaries, 10 bytes a half (40 MiB)
_WEIGHT = 1 << 18  # weights in [1, 2^18]: |sum| <= 2^15 * 2^18 * 2^20 = 2^53, every partial sum an exact float64


class _Values:
    """A keyed hash of the watched tensors' bits before the forward, compared with the same hash after it, in
    batches: no copy of the model. Each tensor's bits (`_bits`, a view where it is contiguous) are read as 16-bit
    signed integers h_i (`_halves`; 1-byte tensors as bytes, 0..255) and laid out per device and width in rows
    of ``width`` <= `_ROW` halves (`_Views.plan`): each tensor starts a row and its last row is padded with
    zeros, so every row holds one tensor's halves. A row's hash is the pair H = sum_i h_i W[i, :], with W the
    guard's secret (width, 2) weights, integers uniform in [1, 2^18] (`_Views.table`), the same for every row.
    Rows are hashed in batches of <= `_BATCH` halves, 3 ops each: the batch's parts (views of the tensors'
    halves and of the padding zeros) concatenated (``cat``, of one dtype: CUDA's cat copies many inputs in one
    kernel only when they share the output's; none for a batch within one tensor), converted to float64 and
    multiplied by W (one ``mm`` of the (rows, width) batch, written into the device's (rows, 2)
    hashes). A device's hashes are one tensor: ``ne``, ``any`` give its flag. A first differing row names its
    tensor.

    Exact and deterministic: |h_i| <= 2^15, 1 <= W <= 2^18 and width <= `_ROW` <= 2^20 terms per row (the zeros
    add nothing) keep every product and every partial sum of a row, in whatever order and grouping the matmul
    sums them (blocked, split, fused multiply-add, on any device and thread count), an integer of magnitude <=
    2^15 2^18 2^20 = 2^53, exact in float64 (the conversion of h_i too), so equal bits give equal hashes and
    nothing rounds. Probabilistic for a write (the guard refuses a change only when the hash sees it): a
    changed row's hash difference is sum_i d_i W[i, c] with d != 0 (integers, |d_i| <= 2^16); fixing every
    weight but W[j, c] for one j with d_j != 0, at most one of its 2^18 equally likely values makes the
    difference 0, and the two columns are independent, so a write chosen without knowing the weights (they
    are secret: drawn from os.urandom, never pickled) goes unseen only if every row it changes cancels, with
    probability <= 2^-36 (that of any one of them). Any one changed half (one bit flipped, -0.0 over 0.0, a NaN
    payload) gives d_j != 0 alone in its row, and d_j W[j, c] != 0: always seen. A tensor with no such view (a
    subclass) is cloned and compared by value.

    Memory: the hashes, 16 bytes per row, rows <= halves / width + tensors (for a large model about halves /
    2^12: 1.2 MiB for GPT-2-small's 622 MiB of float32 parameters), kept from before the forward until the flag
    is read; while hashing, one batch's temporaries: its concatenated halves (2 bytes each) and their float64 copy
    (8 bytes each), <= 10 `_BATCH` bytes = 40 MiB; per device the guard keeps the weights (width x 2 float64,
    <= 64 KiB) and the padding zeros (width halves, <= 8 KiB). No tensor of the model's size."""

    def __init__(self, groups: dict[Any, list[tuple[_Watched, Tensor | None, bool, int]]], views: _Views):
        self.loose = [(w, w.tensor.detach().clone()) for w, _, _, _ in groups.pop(None, ())]
        self.views = views
        self.sharing = views.sharing  # made by the `renew` that gave ``groups``
        self.devices: list[tuple[list, _Plan, Tensor, Tensor]] = []  # items, plan, weights, hashes before
        for device, items in groups.items():
            plan = views.plan(device, items)
            if plan.batches:
                weights = views.table(device, plan.width)
                self.devices.append((items, plan, weights, self._hash(items, plan, weights, False)))
        # each storage's (device, address, bytes) as hashed: a storage resized since (during backward) has moved,
        # and its kept view must not be read (it would read freed memory)
        self.keys = [[_storage_key(b) for _, b, _, _ in items] for items, *_ in self.devices]
        self.moved: _Watched | None = None
        self.found: list[tuple[list, _Plan, Tensor, Tensor]] = []  # items, plan, hashes before, after

    @staticmethod
    def _hash(items: list, plan: _Plan, weights: Tensor, again: bool) -> Tensor:
        """The (rows, 2) hashes of a device's tensors (see the class docstring); ``again``: a tensor whose bits
        are no view of it is read anew."""
        out = torch.empty(plan.rows, 2, dtype=torch.float64, device=weights.device)
        fresh: dict[int, Tensor] = {}
        for batch in plan.batches:
            parts = batch.parts
            if again and batch.stale:  # a copy of a tensor's bits: read it again
                parts = list(parts)
                for j, (i, s, k) in enumerate(batch.spec):
                    if i >= 0 and not items[i][2]:
                        if i not in fresh:
                            fresh[i] = _halves(_bits(items[i][0].tensor))  # type: ignore[arg-type]  # has bits
                        parts[j] = fresh[i].narrow(0, s, k)
            x = parts[0] if len(parts) == 1 else torch.cat(parts)
            rows = x.view(batch.rows, batch.width).to(torch.float64)
            torch.mm(rows, weights[: batch.width], out=out.narrow(0, batch.row, batch.rows))
        return out

    def compare(self) -> Tensor | None:
        """A 0-d bool tensor on the (first) device: some hash differs (None: nothing watched). Both hashes of each
        device are kept for `first_changed`."""
        flags = []
        for (items, plan, weights, before), keys in zip(self.devices, self.keys, strict=True):
            moved = next((w for (w, b, _, _), k in zip(items, keys, strict=True) if _storage_key(b) != k), None)
            if moved is not None:  # its storage was resized: written, and not to be read through the old view
                self.moved = self.moved or moved
                flags.append(torch.ones((), dtype=torch.bool, device=weights.device))
                continue
            now = self._hash(items, plan, weights, True)
            flags.append(torch.ne(now, before).any())
            self.found.append((items, plan, before, now))
        self.devices = []
        flags += [_changed(w.tensor, c) for w, c in self.loose]
        if not flags:
            return None
        return functools.reduce(lambda a, b: a | (b if b.device == a.device else b.to(a.device)), flags)

    def first_changed(self) -> _Watched | None:
        """A tensor whose hash differs: of the first device where one does, the first storage in the order
        watched, and of the tensors on it the first whose bytes span the first changed row (else the first on
        it: a byte of its storage outside every watched tensor, which torch.save writes all the same)."""
        if self.moved is not None:
            return self.moved
        for items, plan, before, now in self.found:
            rows = (now != before).any(1).nonzero().flatten().tolist()
            if rows:
                i, row, k = min((plan.owners[k], r, k) for r in rows for k in [bisect.bisect_right(plan.firsts, r) - 1])
                width = next(b.width for b in plan.batches if b.row <= row < b.row + b.rows)
                size = _halves(items[i][1]).element_size()
                lo = (row - plan.firsts[k]) * width * size
                on = self.sharing.get(id(items[i][1]), [items[i][0]])
                return next((w for w in on if _spans(w.tensor, lo, lo + width * size)), on[0])
        return next((w for w, c in self.loose if bool(_changed(w.tensor, c))), None)


def _spans(t: Tensor, lo: int, hi: int) -> bool:
    """Whether bytes [lo, hi) of ``t``'s storage meet the span of its elements."""
    if t.numel() == 0:
        return False
    first = int(t.storage_offset())
    last = first + sum((int(n) - 1) * abs(int(st)) for n, st in zip(t.shape, t.stride(), strict=True))
    return first * t.element_size() < hi and lo < (last + 1) * t.element_size()


_raw_storage = torch._C.TensorBase.untyped_storage


_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}  # registries and hooks: fingerprinted apart
_HOOK_DICTS = tuple(sorted(k for k, v in nn.Module().__dict__.items() if "hook" in k and isinstance(v, dict)))
_VALUES = (bool, int, float, complex, str, bytes, type(None))
_VALUE_TYPES = frozenset(_VALUES)
_hook_dicts = operator.itemgetter(*_HOOK_DICTS)


def _fingerprint(v: Any, key: str, marks: list[tuple[tuple, Any]], held: list[tuple[str, Tensor]]) -> None:
    """Append the mark of attribute ``key``'s value ``v``: plain values by value, containers by their structure
    and leaves (the tensors in them watched by value as ``key[i]``), tensors and other objects by identity."""
    if isinstance(v, (list, tuple, dict)):
        leaves, spec = tree_flatten(v)
        leaf_marks: list[Any] = [id(v), spec]
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                leaf_marks.append(id(leaf))
                if not isinstance(leaf, nn.Parameter):  # a parameter is watched as one (RNN's _flat_weights)
                    held.append((f"{key}[{i}]", leaf))
            else:
                leaf_marks.append(leaf if isinstance(leaf, _VALUES) else id(leaf))
        marks.append((("container", key), tuple(leaf_marks)))
    else:
        marks.append((("value", key), v if isinstance(v, _VALUES) else id(v)))
        if isinstance(v, Tensor) and not isinstance(v, nn.Parameter):  # set on a tensor object: watched by value
            held.append((key, v))


def _tensor_state(
    t: Tensor, kind: str, key: str, marks: list[tuple[tuple, Any]], held: list[tuple[str, Tensor]]
) -> None:
    """The Python attributes set on a parameter / buffer / tensor object (``p.peak = x.amax()``): pickled and
    deep-copied with it, so fingerprinted like a module's."""
    d = t.__dict__
    if not d:
        marks.append((("tensor names", kind, key), ()))
        return
    names = tuple(k for k in d if not k.startswith("_dp_"))
    marks.append((("tensor names", kind, key), names))
    for k in names:
        _fingerprint(d[k], f"{key}.{k}", marks, held)


def _python_state(
    m: nn.Module, skip: frozenset[str], sharded: bool
) -> tuple[list, list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """A fingerprint of ``m``'s Python state besides its tensors' values (see the module docstring), as
    (what, mark) pairs: attribute names, the submodules by identity, the parameter and buffer registries (a
    name registered or set from None: a tensor registered before is watched with its name), the module hooks,
    plain values by value, containers by their structure and leaves, other objects by identity, and the
    attributes set on its parameters, buffers and tensor attributes; the tensors held in containers (their
    contents are watched), and its tensor attributes. ``sharded``: FSDP2 swaps the module's parameter objects
    in forward."""
    d = m.__dict__
    try:
        hooks = tuple(map(tuple, _hook_dicts(d)))
    except KeyError:  # a module unpickled from an older torch: fewer registries
        hooks = tuple(tuple(d[h]) for h in _HOOK_DICTS if h in d)
    marks: list[tuple[tuple, Any]] = [
        (("names",), tuple(d)),  # compared without dpkernels' "_dp_" names where they differ
        (("submodules",), (tuple(m._modules), tuple(map(id, m._modules.values())))),
        (("buffers",), tuple((k, b is None) for k, b in m._buffers.items()) if m._buffers else ()),
        (("parameters",), tuple((k, p is None) for k, p in m._parameters.items())),
        (("hooks",), hooks),
    ]
    held: list[tuple[str, Tensor]] = []
    attributes: list[tuple[str, Tensor]] = []
    if not sharded:
        for k, p in m._parameters.items():
            if p is not None:
                _tensor_state(p, "parameter", k, marks, held)
    for k, b in m._buffers.items():
        if b is not None and k not in skip:
            _tensor_state(b, "buffer", k, marks, held)
    for k in [k for k in d if k not in _MODULE_INTERNALS]:
        if k in skip or k.startswith("_dp_"):
            continue
        v = d[k]
        if type(v) in _VALUE_TYPES:
            marks.append((("value", k), v))
        elif type(v) is tuple and all(type(e) in _VALUE_TYPES for e in v):  # a conv's kernel_size, ...
            marks.append((("container", k), v))
        elif isinstance(v, Tensor):
            _tensor_state(v, "attribute", k, marks, held)
            if not isinstance(v, nn.Parameter):
                attributes.append((k, v))
        else:
            _fingerprint(v, k, marks, held)
    return marks, held, attributes


def _same_state(before: list, now: list) -> bool:
    if before == now:
        return True
    if len(before) != len(now) or before[0] == now[0]:
        return False
    strip = [(("names",), tuple(k for k in marks[0][1] if not k.startswith("_dp_"))) for marks in (before, now)]
    return strip[0] == strip[1] and before[1:] == now[1:]


_SAID = {
    "submodules": "a submodule added, removed or replaced",
    "buffers": "a buffer registered or set",
    "parameters": "a parameter registered or set",
    "hooks": "a module hook registered or removed",
}


def _python_state_error(name: str, m: nn.Module, before: list, now: list) -> RuntimeError:
    names = [tuple(k for k in marks[0][1] if not k.startswith("_dp_")) for marks in (before, now)]
    if names[0] != names[1]:
        what = f"attributes {sorted(set(names[0]) ^ set(names[1]))} added or removed"
    else:
        code, *args = next((b[0] for b, n in zip(before[1:], now[1:], strict=False) if b != n), ("?",))
        if code in _SAID:
            what = _SAID[code]
        elif code == "tensor names":
            what = f"an attribute set on {args[0]} {args[1]!r}, added or removed"
        elif code == "container":
            what = f"a container (list, tuple, dict) attribute {args[0]!r} changed"
        else:
            what = f"a Python attribute {args[0]!r} changed" if code == "value" else "its Python state changed"
    return RuntimeError(
        f"module {name or '<model>'!r} ({type(m).__name__}) changed its Python state during a DP training forward "
        f"({what}): the module's attributes, and those set on its parameters and buffers, are pickled with the "
        f"model (torch.save, deepcopy), and state written from the batch is learned outside the gradient, with no "
        f"clipping and no noise. Keep per-batch values in local variables, make such state before make_private "
        f"from public data, or put that module in eval mode"
    )


def _written_error(w: _Watched, how: str, when: str = "a DP training forward") -> RuntimeError:
    return RuntimeError(
        f"{w.describe()} was written during {when} ({how}): module state is released with the "
        f"model, and state written from the batch is learned outside the gradient, with no clipping and no noise (its "
        f"value now depends on this batch: do not release this model's state). Put that module in eval mode "
        f"(module.eval()) or disable what writes it (torch.ao.quantization.disable_observer) before training, "
        f"compute the value from public data, or, for a parameter, let the optimizer alone change it"
    )


class _Later:
    """The second half of a training forward's hash (`_Values.compare`), made on the first call and kept: at the
    end of the forward's backward pass (`Engine._check_finite`, whose one host read reads it), or earlier where
    the forward's backward has not come: before the next forward, ``optimizer.step()``, ``load_state_dict``,
    or a release of the model's state. Returns the 0-d flag "every watched value is as before" (None: nothing
    watched)."""

    __slots__ = ("values", "reached", "_out", "_flag", "_done", "__weakref__")

    def __init__(self, values: _Values):
        self.values = values
        # the forward's backward pass has begun (a hook on its output fired); None: its output has no tensor
        # seen (an object pytree does not flatten), so the end of the next backward pass reads it
        self.reached: bool | None = None
        self._out: weakref.ref[Tensor] | None = None  # an output tensor of the forward: its graph is alive
        self._flag: Tensor | None = None
        self._done = False

    def await_backward(self, output: Any) -> bool:
        """Whether a backward pass may still come through the forward's ``output``: hook its tensors that require
        grad, so that the backward which reaches them marks this hash due at its end (`Engine._check_finite`
        reads only those: a forward whose backward has not begun keeps its write window open). False: no output
        tensor requires grad (hash now)."""
        leaves = [t for t in tree_leaves(output) if isinstance(t, Tensor)]
        if not leaves and output is not None:  # an output pytree does not flatten: due at the next backward
            return True
        grads = [t for t in leaves if t.requires_grad]
        if not grads:
            return False
        self.reached, self._out = False, weakref.ref(grads[0])
        mark = weakref.ref(self)
        for t in grads:
            t.register_hook(functools.partial(_mark_reached, mark))
        return True

    def open(self) -> bool:
        """Not made yet, and a backward may still come through the forward's output (alive, not reached)."""
        return not self._done and self.reached is False and self._out is not None and self._out() is not None

    def __call__(self) -> Tensor | None:
        if not self._done:
            with torch.no_grad():
                changed = self.values.compare()
            self._flag = None if changed is None else ~changed
            self._done = True
        return self._flag


def _mark_reached(later: weakref.ref[_Later], grad: Tensor) -> None:
    obj = later()
    if obj is not None:
        obj.reached = True


class _Before(NamedTuple):
    """A training forward's record, taken by the pre-hook."""

    watched: list[_Watched]
    values: _Values
    counts: list[tuple[str, nn.Module, int, list, frozenset[str]]]  # buffers registered; Python state


class _ReleaseCheck:
    """A state_dict pre-hook on every module of a private model, pickled with each (torch.save, pickle,
    deepcopy): before any of them releases its state, the guard's checks still waiting (a training forward whose
    backward has not come) are read, and a model whose state a training forward wrote is refused. A copy's
    check is detached (a copy must go through make_private again to train)."""

    def __init__(self, guard: ForwardGuard | None = None):
        self.guard = None if guard is None else weakref.ref(guard)

    def __call__(self, *args: Any) -> None:
        guard = None if self.guard is None else self.guard()
        if guard is not None:
            guard.before_release()

    def __reduce__(self) -> tuple:
        self()
        return (_ReleaseCheck, ())


class ForwardGuard:
    """Pre- and post-forward hooks on a private model (see the module docstring). ``probe`` is a DP layer of
    the model: DP training is on while its engine says so (checks cost nothing otherwise)."""

    def __init__(self, model: nn.Module, probe: nn.Module):
        self.probe = probe
        self.model = model
        self.modules = [(n, m, _weight_only(m)) for n, m in model.named_modules()]
        self._before: list[_Before | None] = []
        self._views = _Views()
        self._pending: list[list] = []  # the engines' lists holding this guard's checks not yet read
        self.written: str | None = None  # a refusal of this guard: the model's state depends on a batch
        self._pre_id = self._post_id = -1

    def __getstate__(self) -> dict:
        self.before_release()
        return dict(self.__dict__, _before=[], _views=_Views(), _pending=[])

    @staticmethod
    def attach(model: nn.Module, probe: nn.Module) -> ForwardGuard:
        """The model's guard (made and hooked on the first call; later calls point it at ``probe``, after reading
        the checks the earlier engine still holds)."""
        hooks = [getattr(h, "__self__", None) for h in model._forward_pre_hooks.values()]
        guard = next((g for g in hooks if isinstance(g, ForwardGuard)), None)
        if guard is not None:
            with contextlib.suppress(RuntimeError):  # a write seen: kept in guard.written, refused at release
                guard._drain()
            # a guard unpickled from an older dpkernels has no ids: its hooks' order is not checked
            written, ids = (
                getattr(guard, "written", None),
                (getattr(guard, "_pre_id", -1), getattr(guard, "_post_id", -1)),
            )
            guard.__init__(model, probe)  # type: ignore[misc]  # the model's modules may have changed
            guard.written, (guard._pre_id, guard._post_id) = written, ids
        else:
            guard = ForwardGuard(model, probe)
            # First of the pre-hooks and always called after: each pre is paired with its post, errors included.
            guard._pre_id = model.register_forward_pre_hook(guard.pre, with_kwargs=True, prepend=True).id
            guard._post_id = model.register_forward_hook(guard.post, with_kwargs=True, always_call=True).id
            model.register_load_state_dict_pre_hook(guard._before_load)
            model.register_load_state_dict_post_hook(guard._restored)
        release = _ReleaseCheck(guard)
        for _, m, _ in guard.modules:
            for k in [k for k, h in m._state_dict_pre_hooks.items() if isinstance(h, _ReleaseCheck)]:
                del m._state_dict_pre_hooks[k]
            m.register_state_dict_pre_hook(release)
        return guard

    def _training(self) -> bool:
        """A forward of the model in train mode while DP training is enabled, with or without autograd
        recording: a buffer written from the batch under torch.no_grad() is learned from it all the same."""
        eng: Any = self.probe._dp_engine
        return eng is not None and (bool(eng.active()) or (bool(eng.enabled) and self.model.training))

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        stack = _local.__dict__.setdefault("inputs", [])
        stack.append((args, kwargs))
        if not self._training():
            self._before.append(None)
            return
        try:
            self._drain(before_forward=True)  # a forward whose backward never came
            self._check_modules()
        except RuntimeError:
            self._before.append(None)  # paired with the post-hook, which always runs
            raise
        hooks = self.model._forward_hooks
        if self._post_id in hooks and next(reversed(hooks)) != self._post_id:  # a hook registered after ours
            # an OrderedDict: the hook runs before the comparison, and what it writes is seen
            hooks.move_to_end(self._post_id)  # type: ignore[attr-defined]
        # dpkernels.fsdp.ShardedParams; vars(): a copy's DetachedEngine raises on any other attribute read
        sharding: Any = vars(self.probe._dp_engine).get("sharding")
        watched: list[_Watched] = []
        counts = []
        with torch.no_grad():
            for n, m, skip in self.modules:
                marks, held, attributes = _python_state(m, skip, sharding is not None)
                counts.append((n, m, len(m._buffers), marks, skip))
                state = [("buffer", k, b) for k, b in m._buffers.items() if b is not None and k not in skip]
                state += [("attribute", k, t) for k, t in attributes]
                state += [("held tensor", k, t) for k, t in held]
                for kind, k, t in state:
                    watched.append(_Watched(n, m, kind, k, t, t._version, _placement(t)))
                for k, p in m._parameters.items():
                    if p is None:
                        continue
                    shard = sharding.local_shard(p) if sharding is not None else None
                    if shard is not None:  # FSDP2 swaps the module's tensor; its shard is the state
                        watched.append(_Watched(n, m, "sharded parameter", k, shard, shard._version, _placement(shard)))
                    else:
                        watched.append(_Watched(n, m, "parameter", k, p, p._version, _placement(p)))
            entry = _Before(watched, _Values(self._views.renew(watched), self._views), counts)
        self._before.append(entry)

    def _check_modules(self) -> None:
        """Refuse a module set on the model after make_private: none of its tensors is watched (a frozen layer
        swapped in could write the batch into its weight, released with the model)."""
        known = {id(m) for _, m, _ in self.modules}
        for n, m in self.model.named_modules():
            if id(m) not in known:
                raise RuntimeError(
                    f"DP training forward: module {n!r} ({type(m).__name__}) was set on the model after "
                    "make_private, so the privacy guard does not watch its parameters and buffers; set every "
                    "module before make_private (or call make_private again after changing the model)"
                )

    def _check_first(self) -> None:
        """The guard's pre-hook ran first: one registered ahead of it (``prepend=True`` after make_private) ran
        before the guard hashes the model's state, so what it wrote would not be seen. Checked after the forward,
        so that a refusal of the forward itself (fully_shard applied after make_private) comes first."""
        hooks = self.model._forward_pre_hooks
        if self._pre_id in hooks and next(iter(hooks)) != self._pre_id:
            ahead = hooks[next(iter(hooks))]
            raise RuntimeError(
                f"a forward pre-hook ({getattr(ahead, '__qualname__', type(ahead).__name__)}) was registered on the "
                f"private model ahead of dpkernels' guard (prepend=True after make_private): it runs before the "
                f"guard hashes the model's state, so a write it made from the batch would not be seen. Register it "
                f"before make_private, or without prepend=True"
            )

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._before:  # a pre-hook registered before ours raised: ours never ran
            return
        _local.inputs.pop()
        entry = self._before.pop()
        if entry is None:
            return
        self._check_first()
        try:
            self._compare(entry, output)
        except RuntimeError as err:
            self.written = str(err)
            raise

    def _compare(self, entry: _Before, output: Any = None) -> None:
        for name, m, count, _, _ in entry.counts:
            if len(m._buffers) != count:
                raise RuntimeError(
                    f"module {name or '<model>'!r} ({type(m).__name__}) registered a buffer during a DP training "
                    f"forward: a buffer is released with the model, and one made from the batch is learned outside "
                    f"the gradient, with no clipping and no noise. Register buffers before make_private, from "
                    f"public data"
                )
        sharding: Any = vars(self.probe._dp_engine).get("sharding")
        for name, m, _, marks, skip in entry.counts:
            now_marks = _python_state(m, skip, sharding is not None)[0]
            if not _same_state(marks, now_marks):
                raise _python_state_error(name, m, marks, now_marks)
        for w in entry.watched:
            now = w.current()
            if w.kind == "sharded parameter":
                now = sharding.local_shard(now) if now is not None else None
            if now is not w.tensor:
                raise _written_error(w, "replaced by another tensor" if now is not None else "deleted")
            if now._version != w.version:
                raise _written_error(w, "in place")
            if _placement(now) != w.where:
                raise _written_error(w, "through .data")
        later = _Later(entry.values)
        check = functools.partial(self._check_values, later)
        eng: Any = self.probe._dp_engine
        pending = vars(eng).get("deferred_checks") if eng is not None else None
        if torch.is_grad_enabled() and isinstance(pending, list) and later.await_backward(output):
            # hashed and read at the end of the backward pass, with its one host read: a write made during
            # backward (a tensor hook or autograd Function the forward set up) is compared too
            pending.append((later, check))
            if not any(p is pending for p in self._pending):
                self._pending.append(pending)
        else:
            check()

    def settle(self) -> None:
        """Hash now (no host read) the training forwards whose backward has not come, before something changes
        the model's state legitimately: ``optimizer.step()``, ``load_state_dict``."""
        for pending in self._waiting():
            for flag, _ in pending:
                if isinstance(flag, _Later):
                    flag()

    def _waiting(self) -> list[list]:
        """The engines' lists that may hold this guard's checks: those it appended to, and the current engine's."""
        eng: Any = self.probe._dp_engine
        lists = list(self._pending)
        current = vars(eng).get("deferred_checks") if eng is not None else None
        if isinstance(current, list) and not any(p is current for p in lists):
            lists.append(current)
        return lists

    def _drain(self, before_forward: bool = False) -> None:
        """Read the engines' waiting checks (training forwards whose backward has not come). ``before_forward``:
        keep the hash of a forward whose output may still be backpropagated and that nothing has made yet
        (`_Later.open`), so that the writes of its backward are compared too, at that backward's end (or at
        ``optimizer.step()``, which makes it, and the next read)."""
        lists = self._waiting()
        self._pending = []
        for pending in lists:
            checks = list(pending)
            keep = [e for e in checks if before_forward and isinstance(e[0], _Later) and e[0].open()]
            pending[:] = keep
            if keep:
                self._pending.append(pending)
            for entry in checks:
                if not any(entry is k for k in keep):
                    entry[1]()

    def _check_values(self, later: _Later) -> None:
        """Raise if the hash says a value changed, naming a tensor whose hash differs from the one before."""
        same = later()
        if same is None or bool(same):
            return
        w = later.values.first_changed()
        err = _written_error(
            w,  # type: ignore[arg-type]  # the flag says one differs
            "through .data, which bumps no version counter, or through another alias of its memory (numpy(), "
            "untyped_storage(), DLPack, a raw data_ptr()) taken before or during the forward, also to bytes of its "
            "storage outside its elements, which torch.save writes with it; in backward, by a "
            "tensor hook or an autograd Function the forward set up",
            when="a DP training forward or its backward pass",
        )
        self.written = str(err)
        raise err

    def before_release(self) -> None:
        """Before the model's state leaves it (state_dict, pickling, deepcopy of any of its modules): the waiting
        checks are read, and a model a training forward wrote is refused."""
        self._drain()
        if self.written is not None:
            raise RuntimeError(
                f"this model's state is not released (state_dict, torch.save, pickle, deepcopy): a DP training forward "
                f"wrote it from a batch, outside the gradient, and it was refused then: {self.written}. Load the state "
                f"saved before that forward with model.load_state_dict (all keys), or build the model anew"
            )

    def _before_load(self, *args: Any) -> None:
        self.settle()  # the waiting hashes compare the state the forwards left, not the one loaded

    def _restored(self, module: nn.Module, keys: Any) -> None:
        """The root model's state loaded whole (no key missing): a refused write no longer taints it."""
        if not keys.missing_keys:
            self.written = None
