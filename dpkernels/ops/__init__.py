"""One entry point per op, dispatching to a backend.

Backends: ``reference`` (plain PyTorch, any device, the ground truth), ``triton``
(CUDA tensors, or the CPU under TRITON_INTERPRET=1) and ``cuda`` (the csrc
extension). ``auto`` picks per call by device and availability; `set_backend`
forces one process-wide, `use_backend` for the calls of one thread (or asyncio task)
inside a ``with`` block. Each backend registers its ops by name in its module's ``__all__`` (checked
against the reference's signatures when it loads); an op a backend lacks is served by the reference,
with a warning when that backend was asked for; `last_backend` says which backend served each op most
recently, so the choice is visible. The entry points below carry the reference ops' signatures.
Every op's inputs are checked once, here, before any backend runs (`_validate`): all backends
accept and refuse the same inputs, with the same errors.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import ParamSpec, TypeVar, cast

from torch import Tensor

from . import _validate, reference

BACKENDS = ("reference", "triton", "cuda")
_forced: str | None = None
_local: contextvars.ContextVar[str | None] = contextvars.ContextVar("dpkernels_backend", default=None)
_loaded: dict[str, ModuleType | None] = {"reference": reference}
last_backend: dict[str, str] = {}


def _check(name: str | None) -> str | None:
    """``name`` as a forced backend (None for automatic), after checking that it exists and loads."""
    if name in (None, "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")
    if _load(name) is None:
        raise RuntimeError(f"backend {name!r} is not available here: {_errors.get(name, 'not built')}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every op ("reference", "triton", "cuda"), or None / "auto" for automatic.

    Process-wide, so it also reaches the DP layers' backward, which autograd may run on its own threads."""
    global _forced
    _forced = _check(name)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend for the ops this thread (or asyncio task) calls inside the block; None keeps
    the current choice. Unlike `set_backend` it does not reach autograd's worker threads."""
    if name is None:
        yield
        return
    token = _local.set(_check(name) or "auto")
    try:
        yield
    finally:
        _local.reset(token)


def get_backend() -> str:
    """The backend forced for this thread's calls (`use_backend`, else `set_backend`), or "auto"."""
    local = _local.get()
    return local if local is not None else _forced or "auto"


_errors: dict[str, str] = {}


def _load(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"dpkernels.ops.{name}")
        except Exception as exc:  # an optional backend that fails to import is simply unavailable
            _errors[name] = f"{type(exc).__name__}: {exc}"
            _loaded[name] = None
    return _loaded[name]


def available_backends() -> list[str]:
    return [b for b in BACKENDS if _load(b) is not None]


def _auto(device_type: str) -> list[str]:
    """The automatic order. CPU: the reference only. The compiled backend's CPU path measured 0.70x the
    reference's DP step time on the demo CNN and 0.55x / 1.00x on gpt2-tiny at B=4 / 32 in the latest
    run (bench/results/cuda_cpu_vs_reference.md), 1.8x / 0.9x / 0.7x in the one before, both on a
    shared, loaded machine: not a stable win yet, and its first use compiles it (minutes). CUDA:
    triton, then the reference; the compiled backend serves only when asked for by name until its
    kernels have run and been benchmarked on a GPU (bench/gpu_cuda.sh)."""
    if device_type == "cuda":
        return ["triton", "reference"]
    return ["reference"]


# The ops every backend may serve, with the reference's signatures (add_noise, secure_noise, chacha20_blocks:
# see below).
OPS = (
    "linear_norms",
    "linear_clipped_sum",
    "bias_norms",
    "bias_clipped_sum",
    "conv_norms",
    "conv_clipped_sum",
    "embedding_norms",
    "embedding_clipped_sum",
    "embedding_linear_cross",
    "affine_norms",
    "affine_clipped_sum",
    "add_noise",
    "secure_noise",
    "chacha20_blocks",
)
_served: dict[str, dict[str, Callable]] = {}
_warned: set[tuple[str, str]] = set()


def _signature(fn: Callable) -> list[tuple[str, object]]:
    return [(q.name, q.kind) for q in inspect.signature(fn).parameters.values()]


def served(name: str) -> dict[str, Callable]:
    """The ops backend ``name`` registers: the names in its module's ``__all__`` that are ops, each checked
    to take the reference's arguments (a backend whose signature drifted is a bug, refused when it loads)."""
    if name not in _served:
        mod = _load(name)
        table: dict[str, Callable] = {}
        for op in getattr(mod, "__all__", ()) if mod is not None else ():
            if op not in OPS:
                continue
            fn = getattr(mod, op)
            if name != "reference" and _signature(fn) != _signature(getattr(reference, op)):
                raise TypeError(
                    f"backend {name!r} registers {op} with arguments {inspect.signature(fn)}, not the reference's "
                    f"{inspect.signature(getattr(reference, op))}"
                )
            table[op] = fn
        _served[name] = table
    return _served[name]


def resolve(op: str, tensor: Tensor, backend: str | None = None):
    """The callable that serves ``op`` for ``tensor``'s device, and records its backend in `last_backend`.

    A backend that was asked for (``backend=``, `use_backend`, `set_backend`) and does not register ``op``
    leaves it to the reference, with a warning the first time (never a silent substitution)."""
    local = _local.get()
    chosen = backend or (_forced if local is None else None if local == "auto" else local)
    order = [chosen] if chosen else _auto(tensor.device.type)
    for name in order + ["reference"]:
        fn = served(name).get(op)
        if fn is not None:
            if chosen and name != chosen and (chosen, op) not in _warned:
                _warned.add((chosen, op))
                warnings.warn(
                    f"backend {chosen!r} has no {op}: the reference serves it (dpkernels.ops.last_backend says "
                    f"which backend served each op)",
                    stacklevel=3,
                )
            last_backend[op] = name
            return fn
    raise NotImplementedError(op)


def resolve_named(op: str, tensor: Tensor, backend: str | None = None):
    """(callable, backend name) of `resolve`."""
    fn = resolve(op, tensor, backend)
    return fn, last_backend[op]


P = ParamSpec("P")
R = TypeVar("R")


def _entry(ref: Callable[P, R]) -> Callable[P, R]:
    """The dispatching entry point of the reference op ``ref``, with its signature (so type checkers and
    IDEs see the real arguments) and one extra keyword, ``backend=`` (a backend for this call only).
    The op's inputs are checked here, once, before any backend runs."""
    op = ref.__name__
    validate = getattr(_validate, op)  # the same inputs refused, the same way, whichever backend serves

    @functools.wraps(ref)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        backend = cast("str | None", kwargs.pop("backend", None))
        validate(*args, **kwargs)
        return resolve(op, cast(Tensor, args[0]), backend)(*args, **kwargs)

    call.__doc__ = f"Dispatches to ``{op}`` of the chosen backend (keyword ``backend=`` for this call).\n\n" + (
        ref.__doc__ or ""
    )
    return call


# Helpers that are not kernels: always the reference.
linear_norm_method = reference.linear_norm_method
acc_dtype = reference.acc_dtype

linear_norms = _entry(reference.linear_norms)
linear_clipped_sum = _entry(reference.linear_clipped_sum)
bias_norms = _entry(reference.bias_norms)
bias_clipped_sum = _entry(reference.bias_clipped_sum)
conv_norms = _entry(reference.conv_norms)
conv_clipped_sum = _entry(reference.conv_clipped_sum)
embedding_norms = _entry(reference.embedding_norms)
embedding_clipped_sum = _entry(reference.embedding_clipped_sum)
embedding_linear_cross = _entry(reference.embedding_linear_cross)
affine_norms = _entry(reference.affine_norms)
affine_clipped_sum = _entry(reference.affine_clipped_sum)


def add_noise(
    prev, shape, *, noise_std: float, scale: float, seed: int, device, dtype=None, backend: str | None = None
):
    """scale * (prev + noise_std * z) for a parameter no sample touched; see reference.add_noise."""
    import torch

    kw = {} if dtype is None else {"dtype": dtype}
    _validate.add_noise(prev, shape, noise_std=noise_std, scale=scale, seed=seed, device=device, **kw)
    probe = prev if prev is not None else torch.empty(0, device=device)
    return resolve("add_noise", probe, backend)(
        prev, shape, noise_std=noise_std, scale=scale, seed=seed, device=device, **kw
    )


def secure_noise(
    prev, shape, *, noise_std: float, scale: float, key, nonce, device, dtype=None, backend: str | None = None
):
    """scale * (prev + noise_std * z), z the secure-mode Gaussian (ChaCha20 under ``key``, ``nonce``);
    see reference.chacha."""
    import torch

    kw = {} if dtype is None else {"dtype": dtype}
    _validate.secure_noise(prev, shape, noise_std=noise_std, scale=scale, key=key, nonce=nonce, device=device, **kw)
    probe = prev if prev is not None else torch.empty(0, device=device)
    return resolve("secure_noise", probe, backend)(
        prev, shape, noise_std=noise_std, scale=scale, key=key, nonce=nonce, device=device, **kw
    )


def chacha20_blocks(counter, key, nonce, *, backend: str | None = None):
    """The raw ChaCha20 blocks (N, 16) of int64 counters under (key, nonce); see reference.chacha."""
    return resolve("chacha20_blocks", counter, backend)(counter, key, nonce)


# Certified norms (rigorous upper bounds, float64) for the engine: see dpkernels/ops/bounds.py.
from . import certified as certified  # noqa: E402
