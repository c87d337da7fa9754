"""Reference Embedding ops (plain PyTorch): per-sample norms, clipped sum, and the tied-head cross term.

Sample i looks up ids x_i (T,) in a table W (V, D) and receives output gradients g_i (T, D). Its
weight gradient puts g_it on row x_it, so rows repeated in the sample add up:

    dW_i[v] = sum_{t: x_it = v} g_it          (rows v = padding_idx excluded, as in torch)

Everything here works on (B, T) keys and (B, T, D) rows: O(B T D) time and memory, never a
(B, V, D) tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import _chunks, acc_dtype, group_keys, kept, noise_base


def _pad_mask(ids: Tensor, padding_idx: int | None, num_embeddings: int) -> Tensor | None:
    """(B, T) bool, True where the token counts (is not padding_idx); None when nothing is masked."""
    if padding_idx is None:
        return None
    if padding_idx < 0:  # torch's convention: negative indices count from the end of the table
        padding_idx += num_embeddings
    return ids != padding_idx


def _masked_rows(ids: Tensor, g: Tensor, padding_idx: int | None, num_embeddings: int, dt: torch.dtype) -> Tensor:
    """g as (B, T, D) in dtype ``dt`` with padding positions set to 0 (where, not multiply: a non-finite
    output gradient at a padding position must not turn into NaN)."""
    rows = g.reshape(*ids.shape, g.shape[-1]).to(dt)
    keep = _pad_mask(ids, padding_idx, num_embeddings)
    return rows if keep is None else torch.where(keep[..., None], rows, 0)


def embedding_norms(ids: Tensor, g: Tensor, *, num_embeddings: int, padding_idx: int | None) -> Tensor:
    """Per-sample squared norms of an Embedding's weight gradient, exact for repeated tokens:

        ||dW_i||^2 = sum_v || sum_{t: x_it = v} g_it ||^2 = sum_{t,s} [x_it = x_is] (g_it . g_is)

    with tokens equal to ``padding_idx`` excluded. Rows are summed per unique key i * V + x_it
    (index_add into a (B T, D) buffer, one row per distinct key; no host sync), then squared and summed per sample.
    ids: (B, T) integer, g: (B, T, D). Returns (B,) in float32 (float64 for float64 g).
    """
    dt = acc_dtype(g)
    B = ids.shape[0]
    out = torch.zeros(B, device=g.device, dtype=dt)
    if ids.numel() == 0:
        return out
    D = g.shape[-1]
    rows = _masked_rows(ids, g, padding_idx, num_embeddings, dt).reshape(-1, D)
    keys = (torch.arange(B, device=ids.device)[:, None] * num_embeddings + ids).reshape(-1)
    inv, key_of = group_keys(keys)
    summed = torch.zeros(keys.numel(), D, device=g.device, dtype=dt).index_add_(0, inv, rows)
    sample = torch.where(key_of >= 0, key_of // num_embeddings, 0)  # unused groups are zero rows
    return out.index_add_(0, sample, summed.square().sum(dim=1))


def embedding_clipped_sum(
    ids: Tensor,
    g: Tensor,
    c: Tensor,
    *,
    num_embeddings: int,
    padding_idx: int | None,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed: int = 0,
    prev: Tensor | None = None,
) -> Tensor:
    """scale * (prev + sum_i c_i dW_i + noise_std * z), a (V, D) table: index_add of c_i g_it into row x_it.

    The noise z is DENSE over the whole (V, D) table: rows no sample touched get noise too, otherwise
    the set of tokens present in the batch would be released in the clear.

    The padding_idx row receives no data (its per-sample gradient is identically zero, as in torch) but
    it DOES receive noise like every other row. Why this is private: the released table is the clipped
    sum, whose sensitivity is unchanged by the padding row (that row's contribution is 0 for every
    sample), plus independent Gaussian noise on every coordinate; noising one more coordinate can only
    add privacy. Leaving that row un-noised would also be private for a lone Embedding, but not when the
    table is tied to an output head: then ``prev`` carries the head's data-dependent gradient on that
    row, which must be noised. The engine's ``add_noise`` (a step no sample reached) noises it as well,
    so every path gives the same distribution. Consequence: unlike torch, the padding row moves by the
    noise during training; reset it after ``optimizer.step()`` if it must stay fixed (post-processing).
    A sample with c_i = 0 adds exactly 0, even with non-finite rows (_common.kept).
    ids: (B, T), g: (B, T, D), c: (B,). Returns (V, D) in float32 (float64 for float64 g).
    """
    dt = acc_dtype(g)
    D = g.shape[-1]
    rows = kept(_masked_rows(ids, g, padding_idx, num_embeddings, dt), c == 0, dt, c)
    total = noise_base((num_embeddings, D), prev, noise_std, scale, seed, g.device, dt)
    return total.index_add_(0, ids.reshape(-1), rows.reshape(-1, D), alpha=scale)


def embedding_linear_cross(ids: Tensor, g_e: Tensor, a: Tensor, g_h: Tensor, *, padding_idx: int | None) -> Tensor:
    """Per-sample cross term <dE_i, dH_i> of a table W (V, D) used as an Embedding and as a Linear head.

    dE_i[v] = sum_{t: x_t = v} g_e,t (Embedding, ids (B, Te), output gradient g_e (B, Te, D)) and
    dH_i = sum_s g_h,s a_s^T (Linear head y = a W^T, input a (B, Th, D), output gradient g_h (B, Th, V)):

        <dE_i, dH_i> = sum_{t,s} g_h[i, s, x_t] * (a_s . g_e,t)       (padding tokens t excluded)

    computed as sum_t g_e,t . (P^T a)_t with P[s, t] = g_h[i, s, x_t] gathered from g_h: cost
    O(Te Th (D + 1)) per sample, never a (V, D) matrix per sample. With it,
    ||dE_i + dH_i||^2 = ||dE_i||^2 + ||dH_i||^2 + 2 <dE_i, dH_i>. Returns (B,) in float32 (float64).
    """
    dt = acc_dtype(g_e, a, g_h)
    B, Te = ids.shape
    Th, D, V = a.shape[1], a.shape[2], g_h.shape[2]
    out = torch.zeros(B, device=g_e.device, dtype=dt)
    if B == 0 or Te == 0 or Th == 0:
        return out
    keep = _pad_mask(ids, padding_idx, V)
    for sl in _chunks(B, Th * Te + Te * D):
        idx = ids[sl][:, None, :].expand(-1, Th, -1)
        P = torch.gather(g_h[sl], 2, idx).to(dt)  # (b, Th, Te): gather before the cast, g_h is the big one
        ge = g_e[sl].to(dt)
        if keep is not None:
            P = torch.where(keep[sl][:, None, :], P, 0)
            ge = torch.where(keep[sl][..., None], ge, 0)
        out[sl] = ((P.transpose(1, 2) @ a[sl].to(dt)) * ge).sum(dim=(1, 2))
    return out
