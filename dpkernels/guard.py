"""Forward hooks on a private model: what each training forward may and may not do.

- Its input tensors are recorded while it runs (`model_inputs`): a 1-D ids tensor that is one of them
  (or a view of one) holds one id per sample; one made inside the forward (nanoGPT's
  ``wpe(torch.arange(T))``) holds positions shared by every sample, which nothing can tell from the
  batch when T equals the batch size. `dpkernels.nn.DPEmbedding` refuses the latter.
- No module state may be written during a training forward: buffers, tensors kept as plain module
  attributes (``self.stats = torch.zeros(4)``, not registered) and parameters. Such state is released
  with the model, and state written from the batch (a quantization observer's min/max, running
  statistics, a parameter nudged in forward) is learned outside the gradient, without clipping or
  noise. Around the forward, each such tensor's identity, version counter and storage (address,
  offset, shape) are compared, which catches in-place ops, reassignment and ``t.data = x``: one Python
  read each, no host sync. A write through an alias with a version counter of its own (``t.data``,
  ``numpy()``, ``untyped_storage()``, DLPack) bumps none, so values are compared too, read with the
  engine's one read at the end of the backward pass (at once for a forward with no backward to follow):
  buffers and tensor attributes (small: statistics, masks) byte for byte against one flat copy per
  device taken before the forward (one ``cat``; after it one ``cat``, ``ne``, ``any``); a parameter
  only if its memory was handed out during the forward: while a training forward runs, torch.Tensor's
  ``data``, ``numpy``, ``untyped_storage`` and ``__dlpack__`` copy the parameters whose storage they
  alias before returning (they are restored when no training forward runs), so parameters never aliased
  cost nothing. Not seen: a parameter written through an alias taken outside the forward and kept where
  the guard does not look (a global, a closure), or through a raw pointer (``data_ptr()``,
  ``torch.utils.dlpack.to_dlpack``); FSDP2's unsharded parameters (their shards are watched).
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

import functools
import operator
import threading
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


def _bytes(t: Tensor) -> Tensor | None:
    """``t``'s values as a flat uint8 tensor (a view where ``t`` is contiguous), None where torch has no such
    view (sparse, quantized, a tensor subclass): compared byte by byte, a write is seen whatever it writes
    (-0.0 over 0.0, NaN payloads)."""
    if type(t) not in (Tensor, nn.Parameter):  # a subclass (DTensor): cloned, compared by its own ops
        return None
    try:
        return t.detach().reshape(-1).view(torch.uint8)
    except (RuntimeError, TypeError, NotImplementedError):
        return None


class _Values:
    """The values of some watched tensors before the forward: their bytes, concatenated into one copy per device
    (one kernel), and a clone of each tensor without a byte view. `changed` is a 0-d flag on the device."""

    def __init__(self, watched: list[_Watched]):
        self.groups: dict[torch.device, tuple[list[_Watched], Tensor]] = {}
        self.loose: list[tuple[_Watched, Tensor]] = []
        flat: dict[torch.device, tuple[list[_Watched], list[Tensor]]] = {}
        for w in watched:
            b = _bytes(w.tensor)
            if b is None:
                self.loose.append((w, w.tensor.detach().clone()))
            else:
                ws, bs = flat.setdefault(b.device, ([], []))
                ws.append(w)
                bs.append(b)
        for dev, (ws, bs) in flat.items():
            self.groups[dev] = (ws, torch.cat(bs))

    def changed(self) -> Tensor | None:
        flags = []
        for ws, before in self.groups.values():
            now = torch.cat([_bytes(w.tensor) for w in ws])  # type: ignore[misc]  # shapes unchanged: checked
            flags.append((now != before).any())
        flags += [_changed(w.tensor, c) for w, c in self.loose]
        return functools.reduce(operator.or_, flags) if flags else None

    def first_changed(self) -> _Watched | None:
        for ws, before in self.groups.values():
            at = 0
            for w in ws:
                b = _bytes(w.tensor)
                assert b is not None
                if bool((b != before[at : at + b.numel()]).any()):
                    return w
                at += b.numel()
        return next((w for w, c in self.loose if bool(_changed(w.tensor, c))), None)


class _Aliases:
    """The parameters of one training forward, by storage address, and the copies of those whose memory was
    handed out (``.data``, ``numpy()``, ``untyped_storage()``, ``__dlpack__``) during it: such an alias has a
    version counter of its own, so a write through it is seen only by value. A parameter is copied once, before
    its first alias is returned; those never aliased are never copied."""

    def __init__(self, params: list[_Watched]):
        self.by_storage: dict[int, list[_Watched]] = {}
        for w in params:
            if w.where[0]:
                self.by_storage.setdefault(w.where[0], []).append(w)
        self.copied: dict[int, tuple[_Watched, Tensor]] = {}

    def touch(self, address: int) -> None:
        for w in self.by_storage.get(address, ()):
            if id(w) not in self.copied:
                with torch.no_grad():
                    self.copied[id(w)] = (w, w.tensor.detach().clone())


_raw_data: Any = torch._C.TensorBase.data  # the getset descriptor
_raw_storage = torch._C.TensorBase.untyped_storage
_raw_numpy = torch._C.TensorBase.numpy


def _touch(t: Any) -> None:
    """Before an alias of ``t``'s memory is returned in a training forward of this thread: copy the watched
    parameters it may alias."""
    stack = getattr(_local, "aliases", None)
    if not stack:
        return
    try:
        address = _raw_storage(t).data_ptr()
    except (RuntimeError, TypeError, NotImplementedError):  # no storage (sparse, a subclass without one)
        return
    for aliases in stack:
        aliases.touch(address)


class _DataOfTensor:
    """``Tensor.data`` while a training forward runs: the same tensor, after `_touch`."""

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        _touch(obj)
        return _raw_data.__get__(obj, objtype)

    def __set__(self, obj: Any, value: Any) -> None:
        _raw_data.__set__(obj, value)


def _numpy(self: Tensor, *args: Any, **kwargs: Any) -> Any:
    _touch(self)
    return _raw_numpy(self, *args, **kwargs)


def _untyped_storage(self: Tensor) -> Any:
    _touch(self)
    return _raw_storage(self)


_raw_dlpack = torch.Tensor.__dlpack__


def _dlpack(self: Tensor, *args: Any, **kwargs: Any) -> Any:
    _touch(self)
    return _raw_dlpack(self, *args, **kwargs)


_ALIASING = {"data": _DataOfTensor(), "numpy": _numpy, "untyped_storage": _untyped_storage, "__dlpack__": _dlpack}
_patch_lock = threading.Lock()
_patch_users = 0
_unpatched: dict[str, Any] = {}


def _patch_aliasing(on: bool) -> None:
    """Route torch.Tensor's aliasing accessors through `_touch` while any training forward runs (counted over
    threads; each thread's forwards are found in its own `_local`). Outside them torch is untouched."""
    global _patch_users
    with _patch_lock:
        _patch_users += 1 if on else -1
        if on and _patch_users == 1:
            for name, hooked in _ALIASING.items():
                _unpatched[name] = torch.Tensor.__dict__.get(name, _MISSING)
                setattr(torch.Tensor, name, hooked)
        elif not on and _patch_users == 0:
            for name, old in _unpatched.items():
                if old is _MISSING:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, old)


_MISSING = object()
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


def _written_error(w: _Watched, how: str) -> RuntimeError:
    return RuntimeError(
        f"{w.describe()} was written during a DP training forward ({how}): module state is released with the model, "
        f"and state written from the batch is learned outside the gradient, with no clipping and no noise (its value "
        f"now depends on this batch: do not release this model's state). Put that module in eval mode "
        f"(module.eval()) or disable what writes it (torch.ao.quantization.disable_observer) before training, "
        f"compute the value from public data, or, for a parameter, let the optimizer alone change it"
    )


class _Before(NamedTuple):
    """A training forward's record, taken by the pre-hook."""

    watched: list[_Watched]
    values: _Values
    aliases: _Aliases
    counts: list[tuple[str, nn.Module, int, list, frozenset[str]]]  # buffers registered; Python state


class ForwardGuard:
    """Pre- and post-forward hooks on a private model (see the module docstring). ``probe`` is a DP layer of
    the model: DP training is on while its engine says so (checks cost nothing otherwise)."""

    def __init__(self, model: nn.Module, probe: nn.Module):
        self.probe = probe
        self.model = model
        self.modules = [(n, m, _weight_only(m)) for n, m in model.named_modules()]
        self._before: list[_Before | None] = []

    @staticmethod
    def attach(model: nn.Module, probe: nn.Module) -> ForwardGuard:
        """The model's guard (made and hooked on the first call; later calls point it at ``probe``)."""
        for hook in model._forward_pre_hooks.values():
            guard = getattr(hook, "__self__", None)
            if isinstance(guard, ForwardGuard):
                guard.__init__(model, probe)  # type: ignore[misc]  # the model's modules may have changed
                return guard
        guard = ForwardGuard(model, probe)
        # First of the pre-hooks and always called after: each pre is paired with its post, errors included.
        model.register_forward_pre_hook(guard.pre, with_kwargs=True, prepend=True)
        model.register_forward_hook(guard.post, with_kwargs=True, always_call=True)
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
        self._check_deferred()  # a forward whose backward never came
        # dpkernels.fsdp.ShardedParams; vars(): a copy's DetachedEngine raises on any other attribute read
        sharding: Any = vars(self.probe._dp_engine).get("sharding")
        watched: list[_Watched] = []
        valued: list[_Watched] = []
        params: list[_Watched] = []
        counts = []
        with torch.no_grad():
            for n, m, skip in self.modules:
                marks, held, attributes = _python_state(m, skip, sharding is not None)
                counts.append((n, m, len(m._buffers), marks, skip))
                state = [("buffer", k, b) for k, b in m._buffers.items() if b is not None and k not in skip]
                state += [("attribute", k, t) for k, t in attributes]
                state += [("held tensor", k, t) for k, t in held]
                for kind, k, t in state:
                    w = _Watched(n, m, kind, k, t, t._version, _placement(t))
                    watched.append(w)
                    valued.append(w)
                for k, p in m._parameters.items():
                    if p is None:
                        continue
                    shard = sharding.local_shard(p) if sharding is not None else None
                    if shard is not None:  # FSDP2 swaps the module's tensor; its shard is the state
                        watched.append(_Watched(n, m, "sharded parameter", k, shard, shard._version, _placement(shard)))
                    else:
                        w = _Watched(n, m, "parameter", k, p, p._version, _placement(p))
                        watched.append(w)
                        params.append(w)
            entry = _Before(watched, _Values(valued), _Aliases(params), counts)
        self._before.append(entry)
        _local.__dict__.setdefault("aliases", []).append(entry.aliases)
        _patch_aliasing(True)

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._before:  # a pre-hook registered before ours raised: ours never ran
            return
        _local.inputs.pop()
        entry = self._before.pop()
        if entry is None:
            return
        _patch_aliasing(False)
        _local.aliases.pop()
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
        with torch.no_grad():
            flag = entry.values.changed()
            aliased = list(entry.aliases.copied.values())
            for w, copy in aliased:
                changed = _changed(w.tensor, copy)
                flag = changed if flag is None else flag | changed
        if flag is None:
            return
        check = functools.partial(_check_values, flag, entry.values, aliased)
        eng: Any = self.probe._dp_engine
        if torch.is_grad_enabled() and isinstance(vars(eng).get("deferred_checks") if eng is not None else None, list):
            eng.deferred_checks.append((~flag, check))  # read with the backward pass's one host read
        else:
            check()

    def _check_deferred(self) -> None:
        eng: Any = self.probe._dp_engine
        pending = vars(eng).get("deferred_checks") if eng is not None else None
        if pending:
            checks = list(pending)
            pending.clear()
            for _, check in checks:
                check()


def _check_values(flag: Tensor, values: _Values, aliased: list[tuple[_Watched, Tensor]]) -> None:
    """Raise if ``flag`` says a value changed: names the first tensor whose values differ from its copy."""
    if not bool(flag):
        return
    w = values.first_changed()
    if w is not None:
        raise _written_error(w, "through .data, which bumps no version counter")
    for w, copy in aliased:
        if bool(_changed(w.tensor, copy)):
            raise _written_error(
                w,
                "through an alias of its memory taken in the forward (.data, numpy(), ...), which bumps no "
                "version counter",
            )
