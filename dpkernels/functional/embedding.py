"""Embedding: y = W[x] for integer ids x (B, ...) and a table W (V, D).

Per-sample norms sum_v ||sum_{t: x_t = v} g_t||^2 (exact for repeated tokens, padding_idx excluded,
ops.embedding_norms); clipped sum an index_add with noise dense over the table
(ops.embedding_clipped_sum). Several uses of one layer are concatenated along T.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ._common import attach, first_order_only, trainable


def unsupported_reason(module: Any) -> str | None:
    """Why an Embedding's per-sample gradient cannot be computed, with the fix; None if it can."""
    if getattr(module, "scale_grad_by_freq", False):
        return (
            "scale_grad_by_freq=True divides each row's gradient by the token's frequency in the whole "
            "batch, which mixes samples: the per-sample gradient is not defined. Build it with "
            "scale_grad_by_freq=False"
        )
    if getattr(module, "sparse", False):
        return "sparse=True gives sparse gradients; the DP gradient is dense (noise on every row). Use sparse=False"
    if getattr(module, "max_norm", None) is not None:
        return (
            f"max_norm={module.max_norm} renormalises in forward, in place and without noise, exactly the rows of "
            f"the tokens a batch holds, so the weights after a step would show which tokens those were. Use "
            f"max_norm=None"
        )
    return None


def ids_rows(ids: Tensor) -> Tensor:
    """(B, ...) ids -> (B, T) with T the product of the non-batch dimensions (B = 0 safe)."""
    return ids.reshape(ids.shape[0], math.prod(ids.shape[1:]))


def grad_rows(g: Tensor) -> Tensor:
    """(B, ..., D) output gradient -> (B, T, D) (B = 0 safe)."""
    return g.reshape(g.shape[0], math.prod(g.shape[1:-1]), g.shape[-1])


def cat_rows(parts: list[Tensor]) -> Tensor:
    """Concatenate (B, T_k, ...) along T; several uses of a layer are one longer sequence."""
    if len(parts) == 1:
        return parts[0]
    dt = parts[0].dtype
    for p in parts[1:]:
        dt = torch.promote_types(dt, p.dtype)
    return torch.cat([p.to(dt) for p in parts], 1)


class EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, module: Any) -> Tensor:
        ctx.save_for_backward(ids)
        attach(ctx, module)
        # padding_idx only matters for torch's weight gradient, which this Function replaces.
        return F.embedding(ids, weight)

    @staticmethod
    @first_order_only
    def backward(ctx, g: Tensor):
        (ids,) = ctx.saved_tensors
        ctx.module._dp_engine.on_backward(ctx.module, ids, g, ctx)
        return None, None, None

    @staticmethod
    def rows(uses) -> tuple[Tensor, Tensor]:
        """All uses as one (B, T) ids tensor and one (B, T, D) gradient (concatenated along T)."""
        return cat_rows([ids_rows(x) for x, _ in uses]), cat_rows([grad_rows(g) for _, g in uses])

    @staticmethod
    def norms(module: Any, uses) -> dict[int, Tensor]:
        w = trainable(module, "weight")
        if w is None or not uses:
            return {}
        ids, g = EmbeddingFunction.rows(uses)
        module.dp_norm_method = "index"
        return {
            id(w): ops.certified.embedding_norms(
                ids, g, num_embeddings=module.num_embeddings, padding_idx=module.padding_idx
            )
        }

    @staticmethod
    def clipped_sum(module: Any, uses, specs) -> dict[int, Tensor]:
        w = trainable(module, "weight")
        s = specs.get(id(w)) if w is not None else None
        if s is None or not uses:
            return {}
        ids, g = EmbeddingFunction.rows(uses)
        out = ops.embedding_clipped_sum(
            ids,
            g,
            s.c,
            num_embeddings=module.num_embeddings,
            padding_idx=module.padding_idx,
            noise_std=s.noise_std,
            scale=s.scale,
            seed=s.seed,
            prev=s.prev,
        )
        return {id(w): out}
