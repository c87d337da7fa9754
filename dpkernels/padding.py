"""Poisson batches padded to a fixed size, for static shapes (CUDA graphs, torch.compile(mode="reduce-overhead")).

A Poisson batch has Binomial(N, q) samples, so every step has a new shape. With ``pad_to=P`` the loader
appends zero rows up to the bucket size ceil(n / P) * P (P itself unless the batch is larger: then the
next multiple of P, never a split, so a step is still one Poisson sample; with P about q N + 4 sqrt(q N)
that happens about once in 30,000 steps, by the normal approximation) and yields ``(batch, mask)``,
mask[i] True for a drawn sample. ``optimizer.backward(loss, sample_mask=mask)`` multiplies each padded
row's clip factor by 0 on the device (no host read), so the padding adds exactly nothing to the clipped
sum (0 times finite values; a non-finite padded row is refused like any other); the noise, the accounting
and the division by the expected batch size are those of the unpadded batch. A mean loss over the padded
batch is fine: the engine undoes the mean with the batch size it sees.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

# The mask of the last padded batch yielded in this process (a weak reference: owed while the training loop holds
# it), until a backward with a sample mask runs.
_pending: list[weakref.ref[torch.Tensor]] = []


def check_mask_given(has_mask: bool) -> None:
    """Refuse a DP backward without a sample mask while a padded batch's mask is held: its padding rows would
    be trained on, and their number (P minus the realised batch size) moves the update by up to 2 R per sample."""
    if has_mask:
        _pending.clear()
    elif _pending and _pending[0]() is not None:
        raise ValueError(
            "a DP backward without sample_mask after poisson_loader(..., pad_to=...) yielded a padded batch: its "
            "padding rows would be trained on as samples (their number depends on the realised batch size: one "
            "sample would move the step by up to 2 R). Call optimizer.backward(loss, sample_mask=mask) with the "
            "mask the loader yields"
        )


class PaddedLoader(torch.utils.data.DataLoader):
    """A DataLoader of padded batches: the mask of each ``(batch, mask)`` yielded is owed to the next DP backward
    while the caller holds it (see `check_mask_given`; a weak reference, so a loop that drops it owes nothing)."""

    def __iter__(self):  # type: ignore[override]
        for batch, mask in super().__iter__():
            _pending[:] = [weakref.ref(mask)]
            yield batch, mask


def bucket_size(n: int, pad_to: int) -> int:
    """The padded size of a batch of ``n`` samples: the smallest positive multiple of ``pad_to`` >= n."""
    return max(1, -(-n // pad_to)) * pad_to


def check_pad_to(pad_to: Any) -> int:
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be a positive int (the padded batch size), got {pad_to!r}")
    return pad_to


class PaddingCollate:
    """Wraps a collate_fn (an `EmptyBatchCollate`) so that each batch is padded with zero rows to its bucket
    size and comes with its sample mask: ``(batch, mask)``, mask a bool tensor of the padded size."""

    def __init__(self, collate: Callable[[list[Any]], Any], one: Any, two: Any, pad_to: int):
        self.collate = collate
        self.one, self.two = one, two  # dataset[0] collated alone and twice: where the batch dimensions are
        self.pad_to = check_pad_to(pad_to)

    def __call__(self, samples: Sequence[Any]) -> tuple[Any, torch.Tensor]:
        n = len(samples)
        size = bucket_size(n, self.pad_to)
        batch = self.collate(list(samples))
        mask = torch.arange(size) < n
        return _pad(batch, self.one, self.two, size - n, "batch"), mask


def _pad(batch: Any, one: Any, two: Any, k: int, where: str) -> Any:
    """``batch`` with ``k`` zero rows appended along each part's batch dimension (found as in
    `dpkernels.data.EmptyBatchCollate`: the one whose size doubles from one sample to two)."""

    def refuse(why: str) -> TypeError:
        return TypeError(
            f"poisson_loader(pad_to=...) cannot pad {where} ({type(one).__name__}): {why}. Padding needs every "
            f"per-sample field to be a tensor or array with one batch dimension; give a collate_fn that returns "
            f"such fields (e.g. token ids as a tensor, not a list of strings), or leave pad_to unset"
        )

    if batch is None:
        return None
    if isinstance(batch, torch.Tensor | np.ndarray):
        dims = [d for d in range(one.ndim) if one.shape[d] != two.shape[d]]
        if len(dims) != 1:
            raise refuse(f"it has {len(dims)} batch dimensions")
        d = dims[0]
        shape = list(batch.shape)
        shape[d] = k
        if isinstance(batch, torch.Tensor):
            return torch.cat([batch, batch.new_zeros(shape)], dim=d)
        return np.concatenate([batch, np.zeros(shape, dtype=batch.dtype)], axis=d)
    if isinstance(batch, Mapping):
        padded = {key: _pad(batch[key], one[key], two[key], k, f"{where}[{key!r}]") for key in batch}
        return type(batch)(padded)  # type: ignore[call-arg]
    if isinstance(batch, list | tuple):
        if len(one) > 0 and len(two) == 2 * len(one):
            raise refuse("it is a sequence with one entry per sample")
        items = [_pad(b, o, t, k, f"{where}[{i}]") for i, (b, o, t) in enumerate(zip(batch, one, two, strict=True))]
        if hasattr(batch, "_fields"):  # a namedtuple
            return type(batch)(*items)
        return type(batch)(items)
    raise refuse("it is not batched")


__all__ = ["PaddingCollate", "bucket_size"]
