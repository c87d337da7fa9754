"""Helpers every reference op shares: accumulation dtype, chunking, noise and the epilogue.

The conventions of all reference ops (see the package docstring):

Every op works on any device and dtype. Norms and sums accumulate in float32 for
half inputs and in float64 for float64 inputs (so tests can compare in float64).

Shapes follow one convention: ``a`` is a layer input of shape (B, T, d), ``g`` the
gradient of the layer output, (B, T, p), where T collects every non-batch position
(sequence, pixels after unfold). Nothing here knows about modules or the engine.

Noise: every op that writes a gradient computes

    out = scale * (prev + sum_i c_i * grad_i + noise_std * z),   z ~ N(0, I)

with ``z`` drawn from a generator keyed by ``seed`` (one seed per output tensor),
``prev`` an optional accumulated sum (gradient accumulation, tied weights).

Dropped rows: a sample whose clip factor is exactly 0 adds exactly 0 to every clipped sum, whatever its
rows hold (`kept`). A product would not do: 0 * inf and 0 * NaN are NaN, so one sample with a non-finite
activation or output gradient (dropped by the engine's ``nonfinite="drop"``) or a padding row
(dpkernels.padding) would decide whether everyone's sum is finite. Every backend follows this rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Per-chunk budget (elements) for temporaries of the reference: keeps the
# (chunk, T, T) Gram matrices or (chunk, p, d) per-sample gradients bounded.
_CHUNK_ELEMS = 1 << 26


def acc_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs accumulate in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunks(batch: int, per_sample: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_sample))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def group_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Group equal integer keys without a host sync (torch.unique's output size needs one).

    Returns (inv, key_of), both of len(keys): inv[j] is the group of keys[j] (groups numbered in
    sorted key order), key_of[k] the key of group k for k below the number of groups and -1 past
    it. Buffers indexed by group can then have the static size len(keys).
    """
    sorted_keys, order = torch.sort(keys)
    new = torch.ones_like(sorted_keys, dtype=torch.bool)
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    seg = torch.cumsum(new, 0) - 1
    inv = torch.empty_like(seg).scatter_(0, order, seg)
    key_of = torch.full_like(keys, -1).scatter_(0, seg, sorted_keys)  # a group's elements all write its key
    return inv, key_of


def kept(x: Tensor, drop: Tensor, dt: torch.dtype, c: Tensor | None = None) -> Tensor:
    """x (N, ...) in dtype ``dt`` with the rows where ``drop`` (N,) is True (a sample's clip factor c_i is 0)
    set to exactly 0; with ``c`` (N,) each row multiplied by c_i as well. A select, not a product (0 * inf is
    NaN): a row with c_i = 0 adds exactly 0 to a clipped sum, finite or not. Costs one elementwise pass over
    x, in place when the cast or the scaling already made a copy."""
    drop = drop.view(-1, *([1] * (x.dim() - 1)))
    y = x.to(dt)
    if c is not None:
        return (y * c.to(dt).view_as(drop)).masked_fill_(drop, 0)
    return y.masked_fill_(drop, 0) if y is not x else y.masked_fill(drop, 0)


def gaussian(shape, seed: int, device, dtype=torch.float32) -> Tensor:
    """Standard normal noise, deterministic given ``seed`` (an int in [0, 2**63))."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & ((1 << 63) - 1))
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def finish(
    total: Tensor, prev: Tensor | None, noise_std: float, scale: float, seed: int, *, fresh: bool = False
) -> Tensor:
    """scale * (prev + total + noise_std * z): the epilogue every clipped-sum op shares.

    Computed as scale * total + scale * prev + (scale * noise_std) * z, one op per term present (the
    first out of place, the rest in place); ``fresh``: ``total`` is the caller's own temporary, which
    the first term may overwrite too."""
    out = total
    if scale != 1.0:
        out = out.mul_(scale) if fresh else out * scale
        fresh = True
    terms: list[tuple[Tensor, float]] = []
    if prev is not None:
        terms.append((prev, scale))
    if noise_std != 0.0:
        terms.append((gaussian(total.shape, seed, total.device, total.dtype), noise_std * scale))
    for t, alpha in terms:
        out = out.add_(t, alpha=alpha) if fresh else torch.add(out, t.to(out.dtype), alpha=alpha)
        fresh = True
    return out


def finish_mm(x: Tensor, y: Tensor, prev: Tensor | None, noise_std: float, scale: float, seed: int) -> Tensor:
    """scale * (prev + x @ y + noise_std * z): `finish` of a matrix product, the noise (or prev) taken
    in by the product itself (addmm: beta * z + alpha * x @ y)."""
    if noise_std != 0.0:
        z = gaussian((x.shape[0], y.shape[1]), seed, x.device, x.dtype)
        out = torch.addmm(z, x, y, beta=noise_std * scale, alpha=scale)
    elif prev is not None:
        out = torch.addmm(prev.to(x.dtype), x, y, beta=scale, alpha=scale)
        return out
    else:
        out = torch.mm(x, y)
        return out.mul_(scale) if scale != 1.0 else out
    return out.add_(prev, alpha=scale) if prev is not None else out


def noise_base(shape, prev: Tensor | None, noise_std: float, scale: float, seed: int, device, dtype) -> Tensor:
    """scale * (prev + noise_std * z) as a new tensor (zeros when neither is there): what a sum written
    in place with alpha=scale (index_add_) completes to `finish`'s result."""
    if noise_std != 0.0:
        out = gaussian(shape, seed, device, dtype).mul_(noise_std * scale)
        return out.add_(prev, alpha=scale) if prev is not None else out
    if prev is not None:
        return prev.to(dtype) * scale if scale != 1.0 else prev.to(dtype, copy=True)
    return torch.zeros(shape, device=device, dtype=dtype)


def add_noise(
    prev: Tensor | None, shape, *, noise_std: float, scale: float, seed: int, device, dtype=torch.float32
) -> Tensor:
    """scale * (prev + noise_std * z): the update of a parameter no sample touched this step."""
    return noise_base(shape, prev, noise_std, scale, seed, device, dtype)
