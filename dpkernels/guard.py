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
  read each, no host sync. A write through ``t.data`` (``t.data.copy_(x)``) bumps no version counter,
  so buffers and tensor attributes (small: statistics, masks) are also compared by value against a
  copy taken before the forward; the result is read with the engine's one read at the end of the
  backward pass (at once for a forward with no backward to follow). Parameters are not copied (that
  would double the memory traffic of every forward): a ``p.data`` in-place write in forward is the
  one write not detected.
- Nor may a training forward change a module's other Python state, which is pickled with the model
  (``torch.save(model)``, ``copy.deepcopy``): a new attribute (``self.peak = x.amax()``: there was
  nothing to compare on the first forward), a submodule added, a number or string replaced
  (``self.seen = float(x.max())``), a list/tuple/dict changed or a tensor in it written
  (``self.history.append(x.detach())``). Containers are flattened (``torch.utils._pytree``); any other
  object is compared by identity, so state hidden inside one (or in a global or a closure) is not seen.
"""

from __future__ import annotations

import functools
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
    return t.untyped_storage().data_ptr()


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
    copy: Tensor | None  # a copy of the values (buffers and attributes)

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
    return (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape))


def _changed(now: Tensor, before: Tensor) -> Tensor:
    """A 0-d bool tensor: any value of ``now`` differs from ``before`` (NaN equal to NaN), on the device."""
    diff = now != before
    if now.is_floating_point() or now.is_complex():
        diff = diff & ~(now.isnan() & before.isnan())
    return diff.any()


_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}  # hooks and registries: checked otherwise
_VALUES = (bool, int, float, complex, str, bytes, type(None))


def _python_state(m: nn.Module, skip: frozenset[str]) -> tuple[tuple, list[tuple[str, Tensor]]]:
    """A fingerprint of ``m``'s Python state besides its parameters, buffers and tensor attributes (see the
    module docstring): attribute names, submodules, plain values by value, containers by their structure and
    leaves, other objects by identity; and the tensors held in containers (their contents are watched)."""
    own = tuple(k for k in m.__dict__ if not k.startswith("_dp_"))  # dpkernels' own bookkeeping (tap depth)
    marks: list = [own, tuple((k, id(c)) for k, c in m._modules.items())]
    held: list[tuple[str, Tensor]] = []
    for k, v in m.__dict__.items():
        if k in _MODULE_INTERNALS or k in skip or k.startswith("_dp_") or isinstance(v, Tensor):
            continue
        if isinstance(v, (list, tuple, dict)):
            leaves, spec = tree_flatten(v)
            marks.append((k, id(v), spec))
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, Tensor):
                    marks.append(id(leaf))
                    if not isinstance(leaf, nn.Parameter):  # a parameter is watched as one (RNN's _flat_weights)
                        held.append((f"{k}[{i}]", leaf))
                else:
                    marks.append(leaf if isinstance(leaf, _VALUES) else id(leaf))
        else:
            marks.append((k, v if isinstance(v, _VALUES) else id(v)))
    return tuple(marks), held


def _python_state_error(name: str, m: nn.Module, before: tuple, now: tuple) -> RuntimeError:
    keys_before, keys_now = before[0], now[0]
    if keys_before != keys_now:
        what = f"attributes {sorted(set(keys_now) ^ set(keys_before))} added or removed"
    elif before[1] != now[1]:
        what = "a submodule added, removed or replaced"
    else:
        what = "a Python attribute or a container (list, tuple, dict) of it changed"
    return RuntimeError(
        f"module {name or '<model>'!r} ({type(m).__name__}) changed its Python state during a DP training forward "
        f"({what}): the module's attributes are pickled with the model (torch.save, deepcopy), and state written "
        f"from the batch is learned outside the gradient, with no clipping and no noise. Keep per-batch values in "
        f"local variables, make such state before make_private from public data, or put that module in eval mode"
    )


def _tensor_attributes(m: nn.Module) -> list[tuple[str, Tensor]]:
    return [(k, v) for k, v in m.__dict__.items() if isinstance(v, Tensor) and not isinstance(v, nn.Parameter)]


def _written_error(w: _Watched, how: str) -> RuntimeError:
    return RuntimeError(
        f"{w.describe()} was written during a DP training forward ({how}): module state is released with the model, "
        f"and state written from the batch is learned outside the gradient, with no clipping and no noise (its value "
        f"now depends on this batch: do not release this model's state). Put that module in eval mode "
        f"(module.eval()) or disable what writes it (torch.ao.quantization.disable_observer) before training, "
        f"compute the value from public data, or, for a parameter, let the optimizer alone change it"
    )


class ForwardGuard:
    """Pre- and post-forward hooks on a private model (see the module docstring). ``probe`` is a DP layer of
    the model: DP training is on while its engine says so (checks cost nothing otherwise)."""

    def __init__(self, model: nn.Module, probe: nn.Module):
        self.probe = probe
        self.model = model
        self.modules = [(n, m, _weight_only(m)) for n, m in model.named_modules()]
        self._before: list[tuple[list[_Watched], list[tuple[str, nn.Module, int, tuple, frozenset[str]]]] | None] = []

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
        before = None
        if self._training():
            self._check_deferred()  # a forward whose backward never came
            # dpkernels.fsdp.ShardedParams; vars(): a copy's DetachedEngine raises on any other attribute read
            sharding: Any = vars(self.probe._dp_engine).get("sharding")
            before = []
            fingerprints: list[tuple] = []
            with torch.no_grad():
                for n, m, skip in self.modules:
                    state = [("buffer", k, b) for k, b in m._buffers.items() if b is not None and k not in skip]
                    state += [("attribute", k, t) for k, t in _tensor_attributes(m) if k not in skip]
                    marks, held = _python_state(m, skip)
                    fingerprints.append(marks)
                    state += [("held tensor", k, t) for k, t in held]
                    for kind, k, t in state:
                        before.append(_Watched(n, m, kind, k, t, t._version, _placement(t), t.clone()))
                    for k, p in m._parameters.items():
                        if p is None:
                            continue
                        shard = sharding.local_shard(p) if sharding is not None else None
                        if shard is not None:  # FSDP2 swaps the module's tensor; its shard is the state
                            before.append(_Watched(n, m, "sharded parameter", k, shard, shard._version,
                                                   _placement(shard), None))  # fmt: skip
                        else:
                            before.append(_Watched(n, m, "parameter", k, p, p._version, _placement(p), None))
            counts = [  # buffers registered in forward; Python state
                (n, m, len(m._buffers), f, skip) for (n, m, skip), f in zip(self.modules, fingerprints, strict=True)
            ]
            self._before.append((before, counts))
        else:
            self._before.append(None)

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._before:  # a pre-hook registered before ours raised: ours never ran
            return
        _local.inputs.pop()
        entry = self._before.pop()
        if entry is None:
            return
        before, counts = entry
        for name, m, count, _, _ in counts:
            if len(m._buffers) != count:
                raise RuntimeError(
                    f"module {name or '<model>'!r} ({type(m).__name__}) registered a buffer during a DP training "
                    f"forward: a buffer is released with the model, and one made from the batch is learned outside "
                    f"the gradient, with no clipping and no noise. Register buffers before make_private, from "
                    f"public data"
                )
        for name, m, _, marks, skip in counts:
            now_marks = _python_state(m, skip)[0]
            if now_marks != marks:
                raise _python_state_error(name, m, marks, now_marks)
        valued = []
        sharding: Any = vars(self.probe._dp_engine).get("sharding")
        for w in before:
            now = w.current()
            if w.kind == "sharded parameter":
                now = sharding.local_shard(now) if now is not None else None
            if now is not w.tensor:
                raise _written_error(w, "replaced by another tensor" if now is not None else "deleted")
            if now._version != w.version:
                raise _written_error(w, "in place")
            if _placement(now) != w.where:
                raise _written_error(w, "through .data")
            if w.copy is not None:
                valued.append(w)
        if not valued:
            return
        with torch.no_grad():
            flag = torch.stack([_changed(w.tensor, w.copy) for w in valued if w.copy is not None]).any()
        check = functools.partial(_check_values, flag, valued)
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


def _check_values(flag: Tensor, watched: list[_Watched]) -> None:
    """Raise if ``flag`` says a value changed: names the first tensor whose values differ from its copy."""
    if not bool(flag):
        return
    for w in watched:
        if w.copy is not None and bool(_changed(w.tensor, w.copy)):
            raise _written_error(w, "through .data, which bumps no version counter")
