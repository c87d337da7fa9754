"""Poisson sampling: the batches DP-SGD's privacy accounting assumes.

Each step includes every example independently with probability q (the sample
rate), so a batch has Binomial(N, q) examples, and may be empty. The accountant's
PoissonSampled(q, Gaussian(sigma)) event is only valid for batches drawn this way;
shuffled fixed-size batches are a different (and weaker-understood) mechanism.

An empty batch is a valid step: the update is noise only, and the engine divides by
the expected batch size q * N, never by the realised one.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from . import padding
from .padding import PaddingCollate

_BATCHING_KWARGS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_BITS = 53  # bits of one uniform integer draw: exact in float64, and torch.randint's range is a power of two


def poisson_mask(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool, each entry True independently with probability exactly ``sample_rate`` (given uniform bits).

    u < q for a uniform u in [0, 1), decided one 53-bit digit at a time: with q's digits
    t = floor(q 2^53) and k uniform in [0, 2^53), k < t is "in", k > t "out", and k = t (probability 2^-53)
    goes on to the next digit of q (frac(q 2^53), exact in float64: scaling by 2^53 and taking the floor
    round nothing), until q's digits end. ``torch.rand(n) < q`` instead compares against float32 uniforms,
    multiples of 2^-24: its rate is ceil(q 2^24) / 2^24, not q (5.96x q at q = 1e-8, 1.0013x at q = 1e-6),
    which the accountant, counting q, would not cover.
    """
    q = float(sample_rate)
    mask = torch.zeros(n, dtype=torch.bool)
    pending = torch.arange(n)
    while pending.numel() > 0 and q > 0.0:
        t = q * 2.0**_BITS
        digit = math.floor(t)
        k = torch.randint(0, 2**_BITS, (pending.numel(),), generator=generator, dtype=torch.int64)
        mask[pending[k < digit]] = True
        pending = pending[k == digit]
        q = t - digit
    return mask


class PoissonBatchSampler(Sampler[list[int]]):
    """Batches of indices in [0, num_samples), each index included independently with probability q.

    ``steps`` batches per epoch (default round(1 / q), so an epoch sees each example once in
    expectation); a batch may be empty. ``generator`` makes the draws reproducible, and so predictable
    to whoever knows its seed, which voids the amplification by sampling the accounting counts on: for a
    release leave it None, and the draws come from a generator seeded from the operating system's
    entropy (never from torch's global generator, which torch.manual_seed makes predictable).
    """

    def __init__(
        self, num_samples: int, sample_rate: float, steps: int | None = None, generator: torch.Generator | None = None
    ):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
        if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if steps is None:
            steps = max(1, round(1 / sample_rate))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.generator = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))
        if type(self) is PoissonBatchSampler and _world_size() > 1:
            warnings.warn(
                f"a PoissonBatchSampler (poisson_loader) over all {num_samples} examples on each of {_world_size()} "
                f"ranks: an example can be in several ranks' batches of one step (clipped contribution up to "
                f"W R, rate about W q), which the privacy account does not cover. For data-parallel training use "
                f"dpkernels.distributed.distributed_poisson_loader (each rank draws over its own shard)",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = poisson_mask(self.num_samples, self.sample_rate, self.generator)
            yield mask.nonzero().flatten().tolist()

    @property
    def expected_batch_size(self) -> float:
        """q * N: what the DP step divides by."""
        return self.sample_rate * self.num_samples


class EmptyBatchCollate:
    """``collate_fn`` for Poisson batches: an empty batch holds no field of any sample.

    The empty batch has the structure of ``collate_fn([dataset[0]])`` with every per-sample part
    emptied: the batch dimensions of tensors and numpy arrays (found by comparing with
    ``collate_fn([dataset[0], dataset[0]])``: the dimensions whose size doubles) become 0, with the
    dtypes and the other dimensions' sizes kept, and sequences with one entry per sample (the lists of
    strings ``default_collate`` makes) become empty; dicts, tuples and namedtuples keep their keys and
    fields. A value that is not batched this way (a bare string, number or custom object, which could
    only be dataset[0]'s) is refused with `TypeError` naming it, so that no empty step ever trains on
    a sample that was not drawn. (A class, not a closure, so that DataLoader workers can pickle it.)
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any] = default_collate):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self._empty: Any = None
        self._have_empty = False

    def empty(self) -> Any:
        if not self._have_empty:
            s0 = self.dataset[0]
            self._empty = _emptied(self.collate_fn([s0]), self.collate_fn([s0, s0]), "batch")
            self._have_empty = True
        return self._empty

    def __call__(self, batch: Sequence[Any]) -> Any:
        if len(batch) == 0:
            return self.empty()
        return self.collate_fn(list(batch))


def _emptied(one: Any, two: Any, where: str) -> Any:
    """``one`` (a collated batch of one sample) with each part that ``two`` (the same sample twice) shows to
    be per-sample emptied; raises TypeError on a part that is not."""

    def refuse(why: str) -> TypeError:
        return TypeError(
            f"poisson_loader cannot make an empty batch: {where} ({type(one).__name__}) {why}, so it could only "
            f"be copied from dataset[0], a sample the empty step did not draw. Give a collate_fn that returns "
            f"only per-sample fields: tensors or arrays with the batch as a dimension, lists with one entry per "
            f"sample, and dicts / tuples of those"
        )

    if one is None and two is None:
        return None
    if isinstance(one, torch.Tensor | np.ndarray) and type(two) is type(one):
        if one.ndim != two.ndim:
            raise refuse(f"has {one.ndim} dimensions for one sample and {two.ndim} for two")
        batched = [d for d in range(one.ndim) if one.shape[d] != two.shape[d]]
        if not batched or any(two.shape[d] != 2 * one.shape[d] for d in batched):
            shapes = f"{tuple(one.shape)} for one sample and {tuple(two.shape)} for two"
            raise refuse(f"has shape {shapes}: no batch dimension")
        index = tuple(slice(0, 0) if d in batched else slice(None) for d in range(one.ndim))
        return one[index].clone() if isinstance(one, torch.Tensor) else one[index].copy()  # no view of the sample
    if isinstance(one, Mapping) and isinstance(two, Mapping):
        if list(one.keys()) != list(two.keys()):
            raise refuse("has different keys for one sample and for two")
        emptied = {k: _emptied(one[k], two[k], f"{where}[{k!r}]") for k in one}
        try:
            return type(one)(emptied)  # type: ignore[call-arg]
        except TypeError as e:
            raise refuse(f"cannot be rebuilt from its items ({e})") from None
    if isinstance(one, list | tuple) and type(two) is type(one):
        if len(one) > 0 and len(two) == 2 * len(one):  # one entry per sample: none in an empty batch
            return type(one)() if type(one) in (list, tuple) else _rebuild(one, [], refuse)
        if len(two) != len(one):
            raise refuse(f"has {len(one)} entries for one sample and {len(two)} for two")
        fields = getattr(one, "_fields", None)
        names = fields if fields is not None else range(len(one))
        items = [
            _emptied(a, b, f"{where}.{n}" if fields is not None else f"{where}[{n}]")
            for n, a, b in zip(names, one, two, strict=True)
        ]
        return _rebuild(one, items, refuse)
    raise refuse("is not batched (a tensor, an array, or a sequence with one entry per sample)")


def _rebuild(one: Any, items: list[Any], refuse: Callable[[str], TypeError]) -> Any:
    if type(one) in (list, tuple):
        return type(one)(items)
    if hasattr(one, "_fields"):  # a namedtuple
        return type(one)(*items)
    try:
        return type(one)(items)
    except TypeError as e:
        raise refuse(f"cannot be rebuilt from its items ({e})") from None


def poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    pad_to: int | None = None,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """A DataLoader whose batches are Poisson samples of ``dataset`` with rate ``sample_rate``.

    Each batch holds each example independently with probability q = sample_rate
    (expected size q * len(dataset)); ``steps`` batches per epoch, default round(1 / q); ``generator``
    as for `PoissonBatchSampler` (None: seeded from the operating system, not from torch.manual_seed).
    Empty batches hold no field of any sample: zero-size tensors, empty lists (see `EmptyBatchCollate`). Other keyword
    arguments go to DataLoader (num_workers, pin_memory, collate_fn, ...); batch_size,
    shuffle, sampler, batch_sampler and drop_last are refused, since they would change the
    sampling that the privacy accounting assumes. ``pad_to=P``: static shapes, each batch padded with zero
    rows to a multiple of P and yielded as ``(batch, mask)`` for ``optimizer.backward(loss, sample_mask=mask)``
    (see `dpkernels.padding`).
    """
    return poisson_dataloader(
        "poisson_loader", dataset, lambda n: PoissonBatchSampler(n, sample_rate, steps=steps, generator=generator),
        dataloader_kwargs, pad_to=pad_to,
    )  # fmt: skip


def poisson_dataloader(
    name: str,
    dataset: Dataset,
    make_sampler: Callable[[int], Sampler[list[int]]],
    dataloader_kwargs: dict[str, Any],
    pad_to: int | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` whose batches come from ``make_sampler(len(dataset))`` (a Poisson batch
    sampler), with empty batches that hold no field of any sample; ``name`` is the caller's, for errors."""
    bad = [k for k in _BATCHING_KWARGS if k in dataloader_kwargs]
    if bad:
        raise TypeError(
            f"{name} draws its own Poisson batches; remove {bad} (the batch size is "
            f"sample_rate * len(dataset) in expectation)"
        )
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError(f"{name} needs a non-empty dataset (dataset[0] gives the shape of an empty batch)")
    collate = EmptyBatchCollate(dataset, dataloader_kwargs.pop("collate_fn", None) or default_collate)
    collate.empty()  # refuse a batch structure that cannot be emptied now, not at the first empty step
    collate_fn: Callable[[list[Any]], Any] = collate
    if pad_to is not None:
        s0 = dataset[0]
        one, two = collate.collate_fn([s0]), collate.collate_fn([s0, s0])
        collate_fn = PaddingCollate(collate, one, two, pad_to)
        collate_fn([])  # refuse a batch structure that cannot be padded now
    kind = DataLoader if pad_to is None else padding.PaddedLoader  # a padded batch owes its mask to the backward
    return kind(dataset, batch_sampler=make_sampler(n), collate_fn=collate_fn, **dataloader_kwargs)


__all__ = ["EmptyBatchCollate", "PoissonBatchSampler", "poisson_loader", "poisson_mask"]
