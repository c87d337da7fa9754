"""Poisson batches padded to a fixed size, for static shapes (CUDA graphs, torch.compile(mode="reduce-overhead")).

A Poisson batch has Binomial(N, q) samples, so every step has a new shape. With ``pad_to=P`` the loader
appends zero rows up to the bucket size ceil(n / P) * P (P itself unless the batch is larger: then the
next multiple of P, never a split, so a step is still one Poisson sample; with P about q N + 4 sqrt(q N)
that happens about once in 30,000 steps, by the normal approximation) and yields ``(batch, mask)``,
mask[i] True for a drawn sample. ``optimizer.backward(loss, sample_mask=mask)`` multiplies each padded
row's clip factor by 0 on the device (no host read), so the padding adds exactly nothing to the clipped
sum (every clipped-sum op adds exactly 0 for a row whose factor is 0, by a select, so even a non-finite
row would add 0; under nonfinite="raise" a non-finite padded row is still refused like any other); the
noise, the accounting and the division by the expected batch size are those of the unpadded batch. A mean
loss over the padded batch is fine: the engine undoes the mean with the batch size it sees.

Padding rows are zeros, never a copy of a sample, so a row counted by mistake carries no sample's data; but
their number is P - n, so counting them moves the step by up to 2 R per sample. The mask is therefore not
the caller's to choose: the loader records each padded batch it yields (n, P, the mask and its version
counter) while the caller holds the mask. A DP backward without a mask is refused; the loader's mask itself,
unchanged, is taken; any other mask must equal the mask of a padded batch of its size held (compared on
its device, read with the backward's one host read), else the backward is refused before any
.grad is written. Not seen: a batch whose rows were reordered after the loader while its mask was not, or
a batch given with the mask of another padded batch held at the same time.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch


class _Yielded:
    """What the loader knows of one padded batch it yielded: its mask (a weak reference: owed while the caller
    holds it), the mask's version counter then, the realised batch size n and the padded size."""

    def __init__(self, mask: torch.Tensor, n: int):
        self.ref = weakref.ref(mask)
        self.version = mask._version
        self.n, self.size = n, int(mask.shape[0])


# The padded batches yielded in this process whose masks are still held, oldest first.
_yielded: list[_Yielded] = []


def _live() -> list[_Yielded]:
    _yielded[:] = [y for y in _yielded if y.ref() is not None]
    return _yielded


def check_mask_given(has_mask: bool) -> None:
    """Refuse a DP backward without a sample mask while a padded batch's mask is held: its padding rows would
    be trained on, and their number (P minus the realised batch size) moves the update by up to 2 R per sample."""
    if not has_mask and _live():
        raise ValueError(
            "a DP backward without sample_mask after poisson_loader(..., pad_to=...) yielded a padded batch: its "
            "padding rows would be trained on as samples (their number depends on the realised batch size: one "
            "sample would move the step by up to 2 R). Call optimizer.backward(loss, sample_mask=mask) with the "
            "mask the loader yields"
        )


def _wrong_mask(why: str) -> ValueError:
    return ValueError(
        f"sample_mask is not the mask poisson_loader(..., pad_to=...) yielded with the batch: {why}. Padding rows "
        f"counted as samples make the step depend on the realised batch size (one sample would move it by up to "
        f"2 R), and a dropped sample breaks the sampling the accounting assumes. Pass the mask the loader yields "
        f"with the batch, unchanged (the engine moves it to the device), and keep the batch's rows in order"
    )


def loader_mask(mask: torch.Tensor, deferred: list) -> torch.Tensor:
    """The sample mask of a DP backward, checked against the loader's record while padded batches are held.

    The mask the loader yielded, unchanged (same object, same version counter), is taken as it is. Any other
    tensor (a copy on the device, a mask made by hand) must equal the mask of a padded batch of its size held:
    True exactly on its first n rows. The comparison runs on the mask's device; on a GPU its flag joins
    ``deferred``, the backward pass's one host read, which raises before any .grad is written. With no padded
    batch held (padding done by hand) the mask is the caller's."""
    live = _live()
    if not live:
        return mask
    for y in live:
        if y.ref() is mask:
            if mask._version != y.version:
                raise _wrong_mask("the loader's mask was written in place")
            live.remove(y)  # used: a second backward on one forward is refused by the engine
            return mask
    if not isinstance(mask, torch.Tensor) or mask.dim() != 1 or mask.dtype != torch.bool:
        return mask  # the engine refuses its dtype and shape, naming both
    same = [y for y in live if y.size == mask.shape[0]]
    if not same:
        sizes = sorted({y.size for y in live})
        raise _wrong_mask(f"it has {mask.shape[0]} entries, the padded batch(es) held have {sizes}")
    if len(same) == 1:
        live.remove(same[0])
    rows = torch.arange(mask.shape[0], device=mask.device)
    ok = torch.stack([(mask == (rows < n)).all() for n in sorted({y.n for y in same})]).any()

    def check() -> None:
        if not bool(ok):
            raise _wrong_mask("its entries differ from the loader's (True on the drawn samples only)")

    if mask.device.type == "cpu":
        check()
    else:
        deferred.append((ok, check))
    return mask


class PaddedLoader(torch.utils.data.DataLoader):
    """A DataLoader of padded batches: each ``(batch, mask)`` yielded is recorded (see `_Yielded`): a DP backward
    owes the mask while the caller holds it (`check_mask_given`), and a mask other than the loader's is checked
    against the record (`loader_mask`)."""

    def __iter__(self):  # type: ignore[override]
        for batch, mask in super().__iter__():
            # n from the mask, which the collate made as arange(size) < n: one host read of a CPU tensor
            _yielded.append(_Yielded(mask, int(mask.sum())))
            _live()
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
