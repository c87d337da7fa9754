"""Data-parallel DP training on torch.distributed: each rank clips its own samples, the ranks' sums
are added by collectives, and the noise of the global step is added once.

With W ranks, rank r holding batch B_r (its Poisson draw over its shard of the data), every rank
computes the DP step of its own samples with its share of the noise,

    grad_r = (sum_{i in B_r} c_i g_i + (sigma R_total / sqrt(W)) z_r) / E,      z_r ~ N(0, I),

and an all-reduce sums them:

    sum_r grad_r = (sum_{i in B} c_i g_i + sigma R_total z) / E,     z = sum_r z_r / sqrt(W) ~ N(0, I),

the single-process step on the union B of the ranks' batches, divided by the *global* expected batch
size E = q N. Every rank adds sigma / sqrt(W) from its own stream (its own OS-drawn seed; a seed
given to make_private is mixed with the rank) rather than one rank adding all of it, because then no
single rank holds the whole noise: a curious rank that knows its own z_r still faces noise of std
sigma R sqrt((W - 1) / W) on the others' samples, the noise stays fused into each rank's clipped-sum
epilogue with no special rank, and an empty rank contributes noise only. Per-sample norms, clip
factors, clipping groups, ties and two-pass are all per sample, hence per rank: nothing of them
crosses ranks. Parameters and buffers are broadcast from rank 0 at make_private, so every rank
steps the same model with the same summed gradient.

Sampling: `DistributedPoissonSampler` gives every example of the dataset probability q of being in a
global step, independently, whatever W: rank r draws over its shard (indices r, r + W, ...) with its
own secret generator. The accountant counts global steps with the global q, so every rank reports
the same epsilon.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .data import PoissonBatchSampler, poisson_dataloader

BUCKET_BYTES = 25 * 1024 * 1024  # like DDP's default bucket: few collectives, each large enough to run at bandwidth
_FIXED_SIZE_STEPS = 8  # Poisson batches of the same size this many steps running are all but impossible


def resolve_group(distributed: Any) -> Any:
    """The process group of ``make_private(distributed=...)``: True for the default group, or a group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "make_private(distributed=...) needs torch.distributed initialised first: call "
            "torch.distributed.init_process_group(...) in every process (torchrun sets the environment for it)"
        )
    return None if distributed is True else distributed


class DataParallelState:
    """The ranks a private model trains on: the all-reduce of the noised gradients, the checks."""

    def __init__(self, group: Any = None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.sharded: Any = None  # dpkernels.fsdp.ShardedParams when the model is sharded by fully_shard
        self._sizes: list[int] = []
        self._warned = False

    def agree(self, what: dict[str, Any]) -> None:
        """Every rank must train with the same DP configuration, or the sum is not one DP step."""
        mine = sorted(what.items())
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.group)
        for r, theirs in enumerate(every):
            if theirs != mine:
                diff = [k for (k, v), (_, w) in zip(mine, theirs, strict=False) if v != w]
                raise ValueError(
                    f"make_private(distributed=...): rank {r} has a different DP configuration ({diff}) than rank "
                    f"{self.rank}; every rank must call make_private with the same arguments and the same model"
                )

    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank, as DistributedDataParallel does at construction.
        Parameters sharded by fully_shard (DTensors) are left alone: each rank holds its own shard."""
        from torch.distributed.tensor import DTensor

        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if not isinstance(t, DTensor):
                    dist.broadcast(t.data, src=src, group=self.group)

    def sum_grads(self, params: Sequence[Tensor]) -> None:
        """The step's sum over ranks: sharded parameters' shares reduce-scattered to their shards, the others'
        .grad all-reduced."""
        if self.sharded is not None:
            self.sharded.reduce_scatter(params)
            params = [p for p in params if not self.sharded.manages(p)]
        self.all_reduce([p.grad for p in params if p.grad is not None])

    def all_reduce(self, grads: Sequence[Tensor]) -> None:
        """Sum ``grads`` over the ranks in place, bucketed: one collective per ~25 MiB of one dtype/device."""
        buckets: dict[tuple[torch.dtype, torch.device], list[list[Tensor]]] = {}
        filled: dict[tuple[torch.dtype, torch.device], int] = {}  # bytes in each key's last bucket
        for g in grads:
            key = (g.dtype, g.device)
            lists = buckets.setdefault(key, [[]])
            nbytes = g.numel() * g.element_size()
            if lists[-1] and filled.get(key, 0) + nbytes > BUCKET_BYTES:
                lists.append([])
                filled[key] = 0
            lists[-1].append(g)
            filled[key] = filled.get(key, 0) + nbytes
        works = []
        for lists in buckets.values():
            for bucket in lists:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                works.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, bucket))
        for work, flat, bucket in works:
            work.wait()
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def observe_batch(self, size: int | None) -> None:
        """Warn once when the batches look fixed-size: the accountant assumes Poisson sampling."""
        if self._warned or size is None:
            return
        self._sizes.append(size)
        if len(self._sizes) < _FIXED_SIZE_STEPS:
            return
        self._warned = True
        if len(set(self._sizes)) == 1 and self._sizes[0] > 1:
            warnings.warn(
                f"rank {self.rank}'s last {_FIXED_SIZE_STEPS} batches all had {self._sizes[0]} samples: that is what a "
                f"fixed-size or shuffled sampler (DistributedSampler) gives, not Poisson sampling, and the privacy "
                f"accountant's epsilon assumes Poisson sampling. Use dpkernels.distributed.distributed_poisson_loader.",
                stacklevel=3,
            )


class DistributedPoissonSampler(PoissonBatchSampler):
    """This rank's part of a Poisson batch over ``num_samples`` examples shared by ``world_size`` ranks.

    Rank r owns the indices r, r + W, r + 2W, ... and includes each independently with probability q,
    so every example is in a global step with probability q whatever W, and the global batch is the
    union of the ranks' batches (expected size q N, `expected_batch_size`). A rank's batch may be
    empty. Each rank draws from its own generator, seeded from the operating system's entropy unless
    ``generator`` is given (see `PoissonBatchSampler`). Every rank yields the same number of batches
    (``steps``), so their collectives line up.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__(num_samples, sample_rate, steps=steps, generator=generator)
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank = rank
        self.world_size = world_size
        self._shard = torch.arange(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(len(self._shard), generator=self.generator) < self.sample_rate
            yield self._shard[mask].tolist()


def distributed_poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    **dataloader_kwargs: Any,
) -> DataLoader:
    """This rank's DataLoader of Poisson batches (see `DistributedPoissonSampler`); empty batches as in
    `dpkernels.data.poisson_loader`."""
    return poisson_dataloader(
        "distributed_poisson_loader", dataset,
        lambda n: DistributedPoissonSampler(n, sample_rate, steps=steps, generator=generator), dataloader_kwargs,
    )  # fmt: skip


__all__ = ["DataParallelState", "DistributedPoissonSampler", "distributed_poisson_loader", "resolve_group"]
