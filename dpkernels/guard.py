"""Forward hooks on a private model: what each training forward may and may not do.

- Its input tensors are recorded while it runs (`model_inputs`): a 1-D ids tensor that is one of them
  (or a view of one) holds one id per sample; one made inside the forward (nanoGPT's
  ``wpe(torch.arange(T))``) holds positions shared by every sample, which nothing can tell from the
  batch when T equals the batch size. `dpkernels.nn.DPEmbedding` refuses the latter.
- No buffer may be written during a training forward: a buffer is released with the model, and one
  written from the batch (a quantization observer's min/max, running statistics) is learned outside
  the gradient, without clipping or noise. Each buffer's identity and version counter are compared
  around the forward: no copy, no host sync, one Python read per buffer.
"""

from __future__ import annotations

import threading
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

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
    """Buffers of ``m`` that its forward writes from its weights alone, never from the batch: spectral
    normalisation's power-iteration vectors (a function of the private weights, so private too)."""
    from torch.nn.utils.parametrizations import _SpectralNorm
    from torch.nn.utils.spectral_norm import SpectralNorm

    names = {f"{h.name}_{s}" for h in m._forward_pre_hooks.values() if isinstance(h, SpectralNorm) for s in "uv"}
    if isinstance(m, _SpectralNorm):
        names |= {"_u", "_v"}
    return frozenset(names)


class ForwardGuard:
    """Pre- and post-forward hooks on a private model (see the module docstring). ``probe`` is a DP layer of
    the model: DP training is on while its engine says so (checks cost nothing otherwise)."""

    def __init__(self, model: nn.Module, probe: nn.Module):
        self.probe = probe
        self.model = model
        self.modules = [(n, m, _weight_only(m)) for n, m in model.named_modules()]
        self._before: list[list[tuple[str, nn.Module, str, Tensor, int]] | None] = []

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
            before = [
                (n, m, k, b, b._version)
                for n, m, skip in self.modules
                for k, b in m._buffers.items()
                if b is not None and k not in skip
            ]
            before += [(n, m, "", None, len(m._buffers)) for n, m, _ in self.modules]  # buffers registered in forward
        self._before.append(before)

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._before:  # a pre-hook registered before ours raised: ours never ran
            return
        _local.inputs.pop()
        before = self._before.pop()
        for name, m, k, b, version in before or ():
            if b is None:
                if len(m._buffers) != version:
                    raise RuntimeError(
                        f"module {name or '<model>'!r} ({type(m).__name__}) registered a buffer during a DP training "
                        f"forward: a buffer is released with the model, and one made from the batch is learned outside "
                        f"the gradient, with no clipping and no noise. Register buffers before make_private, from "
                        f"public data"
                    )
                continue
            if m._buffers.get(k) is not b or b._version != version:
                where = f"{name}.{k}" if name else k
                raise RuntimeError(
                    f"buffer {where!r} of module {name or '<model>'!r} ({type(m).__name__}) was written during a DP "
                    f"training forward: a buffer is released with the model, and one written from the batch is "
                    f"learned outside the gradient, with no clipping and no noise (its value now depends on this "
                    f"batch: do not release this model's state). Put that module in eval mode (module.eval()) or "
                    f"disable what writes it (torch.ao.quantization.disable_observer) before training, or compute "
                    f"the value from public data"
                )
