"""Poisson sampling: the batches DP-SGD's privacy accounting assumes.

Each step includes every example independently with probability q (the sample
rate), so a batch has Binomial(N, q) examples, and may be empty. The accountant's
PoissonSampled(q, Gaussian(sigma)) event is only valid for batches drawn this way;
shuffled fixed-size batches are a different (and weaker-understood) mechanism.

An empty batch is a valid step: the update is noise only, and the engine divides by
the expected batch size q * N, never by the realised one.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

_BATCHING_KWARGS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


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

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()

    @property
    def expected_batch_size(self) -> float:
        """q * N: what the DP step divides by."""
        return self.sample_rate * self.num_samples


class EmptyBatchCollate:
    """``collate_fn`` for Poisson batches: an empty batch becomes zero-size tensors.

    The empty batch has the structure, dtypes and trailing shapes of ``collate_fn([dataset[0]])``
    with the batch dimension 0, so the model runs on it and the DP step adds noise only.
    (A class, not a closure, so that DataLoader workers can pickle it.)
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any] = default_collate):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self._empty: Any = None

    def empty(self) -> Any:
        if self._empty is None:
            one = self.collate_fn([self.dataset[0]])
            self._empty = tree_map(lambda t: t[:0].clone() if isinstance(t, torch.Tensor) else t, one)
        return self._empty

    def __call__(self, batch: Sequence[Any]) -> Any:
        if len(batch) == 0:
            return self.empty()
        return self.collate_fn(list(batch))


def poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """A DataLoader whose batches are Poisson samples of ``dataset`` with rate ``sample_rate``.

    Each batch holds each example independently with probability q = sample_rate
    (expected size q * len(dataset)); ``steps`` batches per epoch, default round(1 / q); ``generator``
    as for `PoissonBatchSampler` (None: seeded from the operating system, not from torch.manual_seed).
    Empty batches come as zero-size tensors (see `EmptyBatchCollate`). Other keyword
    arguments go to DataLoader (num_workers, pin_memory, collate_fn, ...); batch_size,
    shuffle, sampler, batch_sampler and drop_last are refused, since they would change the
    sampling that the privacy accounting assumes.
    """
    bad = [k for k in _BATCHING_KWARGS if k in dataloader_kwargs]
    if bad:
        raise TypeError(
            f"poisson_loader draws its own Poisson batches; remove {bad} (the batch size is "
            f"sample_rate * len(dataset) in expectation)"
        )
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("poisson_loader needs a non-empty dataset (dataset[0] gives the shape of an empty batch)")
    collate = EmptyBatchCollate(dataset, dataloader_kwargs.pop("collate_fn", None) or default_collate)
    sampler = PoissonBatchSampler(n, sample_rate, steps=steps, generator=generator)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **dataloader_kwargs)


__all__ = ["EmptyBatchCollate", "PoissonBatchSampler", "poisson_loader"]
