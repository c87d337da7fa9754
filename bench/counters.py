"""What a training step costs a device, counted on the CPU: host syncs, kernel-like ops, Triton launches, FLOPs
and peak tensor memory. Counts hold on any device (the same aten ops run on CUDA), times do not.

- `StepCounter` (a TorchDispatchMode) sees every aten op that reaches the dispatcher from Python or autograd:
  it counts the ops that make the host wait for the device on CUDA (`SYNCING`), the kernel-like ones (all but
  views, metadata and allocation-only ops: `is_kernel_like`), and the calls of other namespaces (dpkernels'
  Triton ``torch.library`` ops, whose inner aten ops are counted too by running their Python body under
  the mode; the compiled backend's C++ ops are one call each).
- `count_triton_launches` wraps the Triton interpreter's launcher (``InterpretedFunction.run``), so every grid
  launch is counted, whoever made it.
- `memory_timeline` reads every allocation and free of the CPU allocator from the profiler (kineto memory
  events), so the peak of live tensor bytes is exact: weights, gradients, optimizer state, activations and
  every temporary, C++-internal ones included; unlike RSS it does not count the pages an allocator keeps.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = frozenset(
    {
        "aten._local_scalar_dense.default",  # .item(), bool(t), t.tolist(), int(t)
        "aten.is_nonzero.default",
        "aten.nonzero.default",
        "aten.unique.default",
        "aten._unique.default",
        "aten._unique2.default",
        "aten.unique_dim.default",
        "aten.unique_consecutive.default",
        "aten.masked_select.default",
        "aten.repeat_interleave.Tensor",
        "aten.equal.default",
    }
)
# Ops that launch no kernel: allocation without initialisation, and metadata-only ops that are not marked as
# views in their schema (views and in-place views are recognised from the schema, see `is_kernel_like`).
NO_KERNEL = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "detach",
        "lift_fresh",
        "set_",
        "resize_",
        "_reshape_alias",
        "_unsafe_view",  # a view that autograd does not track as one (reshape's copy-free case, einsum, matmul)
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "size",
        "stride",
        "is_same_size",
        "_has_compatible_shallow_copy_type",
        "_local_scalar_dense",  # a sync (counted as such), not a kernel launch
        "is_nonzero",
        "equal",
    }
)


def is_kernel_like(func: Any) -> bool:
    """Whether an aten op launches (at least) one kernel on a GPU: not a view (``func.is_view``), not an
    in-place view (``torch.Tag.inplace_view``: t_, transpose_, ...), not in `NO_KERNEL`."""
    if func.is_view or torch.Tag.inplace_view in func.tags:
        return False
    return func._schema.name.split("::")[-1] not in NO_KERNEL


class StepCounter(TorchDispatchMode):
    """Counts aten ops by name: ``syncs`` (those in `SYNCING`), ``kernels`` (kernel-like), ``other`` (all the
    rest), and ``custom`` (ops outside the aten namespace, counted once per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()
        self.other: collections.Counter[str] = collections.Counter()
        self.custom: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNCING:
            self.syncs[name] += 1
        if func.namespace == "profiler":  # record_function markers
            return func(*args, **(kwargs or {}))
        if func.namespace != "aten":
            self.custom[name] += 1
            impl = _python_impl(func)
            if impl is not None:  # a dpkernels torch.library op: count the aten ops inside it as well
                with self:
                    return impl(*args, **(kwargs or {}))
        elif is_kernel_like(func):
            self.kernels[name] += 1
        else:
            self.other[name] += 1
        return func(*args, **(kwargs or {}))


def _python_impl(func: Any) -> Any:
    """The Python function behind a dpkernels ``torch.library.custom_op`` (None for any other op): a dispatch
    mode is off while an op it intercepted runs, so the ops inside are counted by calling it under the mode."""
    from torch._library.custom_ops import OPDEFS

    qualname = func._schema.name
    if not qualname.startswith("dpkernels::") or qualname not in OPDEFS:
        return None
    return OPDEFS[qualname]._init_fn


# The SyncCounter of tests/engine/test_syncs.py: a StepCounter read for its ``syncs``.
SyncCounter = StepCounter


@contextlib.contextmanager
def count_triton_launches() -> Iterator[collections.Counter[str]]:
    """Count Triton grid launches by kernel name inside the block (the interpreter's launcher, wrapped; a
    no-op where Triton is not installed or not interpreting)."""
    out: collections.Counter[str] = collections.Counter()
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        yield out
        return
    run = InterpretedFunction.run

    def counted(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if not warmup:
            out[self.__name__] += 1
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = counted  # type: ignore[method-assign]
    try:
        yield out
    finally:
        InterpretedFunction.run = run  # type: ignore[method-assign]


class MemoryTimeline:
    """The CPU allocator's allocations and frees, recorded by the profiler from `start` on; `peak(marker)` is
    the most bytes live at once inside the ``record_function(marker)`` window, counted from `start`."""

    def __init__(self, stacks: bool = False) -> None:
        from torch.profiler import ProfilerActivity, profile

        # stacks: Python frames on every op too, for `holders` (slower; off for the counts)
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=stacks)

    def __enter__(self) -> MemoryTimeline:
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)

    def peak(self, marker: str) -> dict[str, int]:
        """{"peak_bytes": max live bytes inside the window, "start_bytes": live at its start, "end_bytes": at
        its end}; live bytes count every tensor allocated since the profile began and not yet freed."""
        events = list(self._prof.profiler.kineto_results.events())  # type: ignore[union-attr]
        window = [e for e in events if e.name() == marker]
        if len(window) != 1:
            raise RuntimeError(f"MemoryTimeline: expected one {marker!r} window, found {len(window)}")
        t0, t1 = window[0].start_ns(), window[0].end_ns()
        mem = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type()
                      == torch.autograd.DeviceType.CPU), key=lambda x: x[0])  # fmt: skip
        live = start = peak = 0
        seen = False
        for t, nbytes in mem:
            if t > t1:
                break
            if t >= t0 and not seen:
                start, peak, seen = live, live, True
            live += nbytes
            if t >= t0:
                peak = max(peak, live)
        if not seen:
            start = peak = live
        return {"peak_bytes": peak, "start_bytes": start, "end_bytes": live}

    def holders(self, marker: str, top: int = 12, frames: int = 4) -> list[dict[str, Any]]:
        """What is live at the peak of the ``record_function(marker)`` window, largest first: the live
        allocations grouped by the site that made them (the aten op, under the innermost ``frames`` Python
        frames of the repository, with ``MemoryTimeline(stacks=True)``) and by whether they were made before
        the window (weights, earlier state) or inside it. [{"mib", "when", "site"}], ``top`` groups."""
        from torch._C._profiler import _EventType

        events = list(self._prof.profiler.kineto_results.events())  # type: ignore[union-attr]
        window = [e for e in events if e.name() == marker]
        if len(window) != 1:
            raise RuntimeError(f"MemoryTimeline: expected one {marker!r} window, found {len(window)}")
        t0, t1 = window[0].start_ns(), window[0].end_ns()
        allocs: list[tuple[int, int, int, tuple[str, ...]]] = []
        todo = [(e, ()) for e in self._prof.profiler.kineto_results.experimental_event_tree()]  # type: ignore[union-attr]
        while todo:
            e, path = todo.pop()
            if e.tag == _EventType.Allocation:
                f = e.extra_fields
                if f.device.type == "cpu":
                    allocs.append((e.start_time_ns, f.ptr, f.alloc_size, path))
                continue
            if e.tag in (_EventType.TorchOp, _EventType.PyCall):
                path = (*path, e.name)
            todo.extend((c, path) for c in e.children)
        allocs.sort(key=lambda a: a[0])
        live: dict[int, tuple[int, int, tuple[str, ...]]] = {}
        cur, peak, at_peak = 0, -1, dict(live)
        for t, ptr, size, path in allocs:
            if t > t1:
                break
            if size > 0:
                live[ptr] = (size, t, path)
            else:
                live.pop(ptr, None)
            cur += size
            if t >= t0 and cur > peak:
                peak, at_peak = cur, dict(live)

        def ours(frame: str) -> bool:  # the repository's frames (the profiler names a file relative to sys.path)
            file = frame.split("(")[0]
            mine = file.startswith(("dpkernels/", "bench/", "tests/", "examples/", "test_"))
            return mine and file != "bench/counters.py"

        groups: collections.Counter[tuple[str, str]] = collections.Counter()
        for size, t, path in at_peak.values():
            ops = [n for n in path if "::" in n and "/" not in n]
            py = [n for n in path if ours(n)]
            site = " < ".join(reversed([*py[-frames:], *(ops[-1:] or ["?"])]))
            groups[("before" if t < t0 else "in", site)] += size
        return [{"mib": round(n / 2**20, 1), "when": w, "site": s} for (w, s), n in groups.most_common(top)]
