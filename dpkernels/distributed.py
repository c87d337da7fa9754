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

The all-reduce is bucketed (~25 MiB) and overlaps with backward: a parameter's share is final as soon
as its clipping group's sums are (noise fused), and each bucket starts once its shares are final and
the buckets before it have started, in an order fixed for the run, so every rank issues the same
collectives in the same order (see `DataParallelState.final`); ``step()`` waits for them. A rank that
changes a gradient between backward and ``step()`` has it overwritten by the sum.

Sampling: `DistributedPoissonSampler` gives every example of the dataset probability q of being in a
global step, independently, whatever W: rank r draws over its shard (indices r, r + W, ...) with its
own secret generator. The accountant counts global steps with the global q, so every rank reports
the same epsilon.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from . import pruning
from .data import PoissonBatchSampler, poisson_dataloader, poisson_mask
from .engine import _mix64

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
        self.bucket_bytes = BUCKET_BYTES
        self.launches: list[int] = []  # per bucket launched: the DP layers still to run backward then (-1: at step)
        self._sizes: list[int] = []
        self._warned = False
        self._mask_digests: dict[int, tuple[Any, int]] = {}  # id(mask) -> (mask, its digest), masks never change

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

    def agree_step(self, engine: Any, accountant: Any) -> None:
        """What a step's noise and sensitivity depend on, and may change after make_private, must be the same on
        every rank: the pruning masks (a coordinate one rank prunes gets the others' samples with noise
        sigma R sqrt((W - 1) / W) only), the noise multipliers, the clipping bounds, the expected batch size,
        the step counter and the privacy account. One all-reduce (MAX) of [d, -d] per digest d: they agree
        iff max d == min d, which every rank sees, so every rank raises together. Called after the step's
        gradient buckets, so the ranks' collectives stay in the same order."""
        masks = [(i, k, self._mask_digest(pruning.mask_of(m, k))) for i, (m, k, _) in enumerate(engine._owned)]
        parts = {
            "pruning masks": masks,
            "noise multipliers": (engine.noise_multiplier, engine.grad_noise_multiplier),
            "clipping bounds": list(engine.bounds),
            "expected batch size": engine.expected_batch_size,
            "step counter": engine.steps,
            "privacy account": None if accountant is None else repr(accountant.history),
        }
        d = torch.tensor([_digest(repr(v).encode()) for v in parts.values()], dtype=torch.int64)
        both = torch.cat([d, -d])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        hi, lo = both[: len(d)].tolist(), (-both[len(d) :]).tolist()
        differ = [k for k, a, b in zip(parts, hi, lo, strict=True) if a != b]
        if differ:
            raise ValueError(
                f"the ranks' DP configurations differ at step {engine.steps} ({', '.join(differ)}): their sum is not "
                f"one DP step (no step was taken). Change them on every rank alike: apply_masks, make_private and the "
                f"optimizer's settings with the same arguments on each rank"
            )

    def _mask_digest(self, mask: Any) -> int | None:
        if mask is None:
            return None
        hit = self._mask_digests.get(id(mask))
        if hit is None or hit[0] is not mask:
            keep = mask.to(torch.device("cpu")).keep  # the engine's private copy (refuses an in-place edit)
            hit = self._mask_digests[id(mask)] = (mask, _digest(keep.to(torch.uint8).numpy().tobytes()))
        return hit[1]

    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank, as DistributedDataParallel does at construction.
        Parameters sharded by fully_shard (DTensors) are left alone: each rank holds its own shard."""
        from torch.distributed.tensor import DTensor

        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if not isinstance(t, DTensor):
                    dist.broadcast(t.data, src=src, group=self.group)

    # ---------------------------------------------------------------- all-reduce overlapped with backward
    # The unsharded parameters' all-reduce buckets are fixed for the run (``bucket_bytes`` of one dtype/device,
    # in reverse parameter order: backward finishes the last layers first), and every rank launches them in
    # that order, bucket k once its parameters' final shares are known and buckets 0..k-1 launched. So the
    # ranks issue the same collectives in the same order whenever each becomes ready (during backward where a
    # clipping group finishes early, or at step() on a rank with an empty batch that skipped backward), and no
    # collective ever pairs one rank's bucket with another's. step() waits for them.

    def _plan(self, params: Sequence[Tensor]) -> None:
        buckets: list[list[Tensor]] = []
        key, size = None, 0
        for p in reversed(params):
            if self.sharded is not None and self.sharded.manages(p):
                continue
            nbytes = p.numel() * p.element_size()
            if not buckets or (p.dtype, p.device) != key or size + nbytes > self.bucket_bytes:
                buckets.append([])
                key, size = (p.dtype, p.device), 0
            buckets[-1].append(p)
            size += nbytes
        self._buckets = buckets
        self._bucket_of = {id(p): k for k, b in enumerate(buckets) for p in b}
        self.reset_step()

    def reset_step(self) -> None:
        """Forget the step's shares and launched buckets (a step abandoned after an error)."""
        self._ready: dict[int, Tensor] = {}  # this step's final shares, by parameter
        self._left = [len(b) for b in getattr(self, "_buckets", [])]
        self._next = 0
        self._works: list[tuple[Any, Tensor, list[Tensor]]] = []

    def final(self, params: Sequence[Tensor], p: Tensor, grad: Tensor, progress: int = -1) -> None:
        """``grad`` is rank's final (noised) share of ``p``'s gradient for this step: launch every bucket now
        complete, in order. ``progress``: the backward's progress at this point (for the record of launches)."""
        if getattr(self, "_buckets", None) is None:
            self._plan(params)
        k = self._bucket_of.get(id(p))
        if k is None or id(p) in self._ready:
            return
        self._ready[id(p)] = grad
        self._left[k] -= 1
        while self._next < len(self._buckets) and self._left[self._next] == 0:
            bucket = self._buckets[self._next]
            flat = torch.cat([self._ready[id(q)].reshape(-1) for q in bucket])
            self._works.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, bucket))
            self.launches.append(progress)
            self._next += 1

    def sum_grads(self, params: Sequence[Tensor]) -> None:
        """The step's sum over ranks: sharded parameters' shares reduce-scattered to their shards, the others'
        buckets (launched as they became final; every share is final now) waited for and copied to .grad."""
        if self.sharded is not None:
            self.sharded.reduce_scatter(params)
        if getattr(self, "_buckets", None) is None:
            self._plan(params)
        for p in params:  # the shares finish_step wrote (parameters no sample of this rank reached)
            if p.grad is None and id(p) in self._bucket_of:
                raise RuntimeError(f"no gradient share for a parameter of shape {tuple(p.shape)} at the step")
            if p.grad is not None:
                self.final(params, p, p.grad)
        for work, flat, bucket in self._works:
            work.wait()
            offset = 0
            for q in bucket:
                if q.grad is not None:
                    q.grad.copy_(flat[offset : offset + q.numel()].view_as(q.grad))
                offset += q.numel()
        self.reset_step()

    def all_reduce(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` over the ranks in place (small state all-reduced at step(), adaptive clipping's counts)."""
        for t in tensors:
            dist.all_reduce(t, group=self.group)

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


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1  # fits an int64


class DistributedPoissonSampler(PoissonBatchSampler):
    """This rank's part of a Poisson batch over ``num_samples`` examples shared by ``world_size`` ranks.

    Rank r owns the indices r, r + W, r + 2W, ... and includes each independently with probability q,
    so every example is in a global step with probability q whatever W, and the global batch is the
    union of the ranks' batches (expected size q N, `expected_batch_size`). A rank's batch may be
    empty. Each rank draws from its own generator, seeded from the operating system's entropy unless
    ``generator`` is given (see `PoissonBatchSampler`); a given generator seeds a stream of its own per
    rank (its next draw mixed with the rank), so the same generator on every rank does not draw the
    same pattern on every shard (examples r and r + 1 always in a step together). Every rank yields the
    same number of batches (``steps``), so their collectives line up.
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
        if generator is not None and world_size > 1:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            self.generator = torch.Generator().manual_seed(_mix64(seed, rank))
        self._shard = torch.arange(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = poisson_mask(len(self._shard), self.sample_rate, self.generator)
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
