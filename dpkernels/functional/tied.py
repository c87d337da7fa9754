"""Per-sample norms of parameters shared by several DP modules (tied weights).

The per-sample gradient of a shared parameter is the SUM of every module's contribution, so its norm
must be taken of that sum: summing per-module norms is wrong (it under- or over-states the norm and so
the sensitivity) and never happens here. Supported, exactly:

- Linear layers sharing a weight and/or a bias: the sum of G_k^T A_k over modules k is the gradient of
  one Linear whose uses are all the modules' uses concatenated along T (ghost/inst norm on those rows).
- Embeddings and Linear layers sharing one table W (V, D) (GPT-2's wte / lm_head, encoder/decoder
  embeddings): with dE_i the summed embedding gradient (all embedding uses concatenated along T) and
  dH_i the summed head gradient,
      ||dE_i + dH_i||^2 = ||dE_i||^2 + ||dH_i||^2 + 2 <dE_i, dH_i>
  with the cross term from ops.embedding_linear_cross. A head's own bias is a separate parameter.

Anything else sharing a trainable parameter (Conv, norm layers, mixed kinds) is refused by
`check_tie` when make_private builds the ties. Clipped sums of a shared parameter need nothing here:
the engine chains each owner's clipped_sum through ``prev`` and adds the noise once, in the last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.bounds import Bound
from .embedding import EmbeddingFunction, cat_rows, unsupported_reason
from .linear import LinearFunction

_HOW = (
    "dpkernels computes the per-sample gradient of a shared parameter only for Linear layers sharing "
    "weights/biases and for Embedding and Linear layers sharing one table (tied input/output embeddings). "
    "Untie them (give each module its own nn.Parameter, e.g. by cloning it) or freeze the shared parameter "
    "(requires_grad_(False))"
)


def _kind(m: nn.Module) -> str | None:
    fn = getattr(type(m), "dp_function", None)
    if fn is LinearFunction:
        return "linear"
    if fn is EmbeddingFunction:
        return "embedding"
    return None


def _roles(m: nn.Module, p: Tensor) -> list[str]:
    return [n for n, q in m._parameters.items() if q is p]


def check_tie(modules: Sequence[nn.Module], names: Sequence[str]) -> None:
    """Raise ValueError naming the modules if their shared parameters cannot be handled exactly."""
    desc = ", ".join(f"{n!r} ({type(m).__name__})" for n, m in zip(names, modules, strict=True))
    for n, m in zip(names, modules, strict=True):
        kind = _kind(m)
        if kind is None:
            raise ValueError(f"modules {desc} share a trainable parameter, and {n!r} is a {type(m).__name__}: {_HOW}.")
        reason = unsupported_reason(m) if kind == "embedding" else None
        if reason is not None:
            raise ValueError(f"modules {desc} share a trainable parameter, and {n!r} cannot be made private: {reason}.")
    # With only these two kinds every sharing is one of the supported forms: an Embedding's table is 2-D,
    # so it can only be a Linear's weight, and a Linear weight (2-D) can never be another's bias (1-D).


def _linear_rows(tie: Any, mods: list[nn.Module]) -> tuple[Tensor, Tensor]:
    rows = [LinearFunction._rows(tie.uses[m]) for m in mods]
    return cat_rows([a for a, _ in rows]), cat_rows([g for _, g in rows])


def _embedding_rows(tie: Any, mods: list[nn.Module]) -> tuple[Tensor, Tensor, int | None]:
    """(ids, g, padding_idx) of all embedding uses along T; padding positions of modules whose padding_idx
    differs are zeroed in g (they contribute nothing) so that one padding_idx (None) serves all."""
    pads: list[int | None] = [m.padding_idx for m in mods]  # type: ignore[misc]
    if len(set(pads)) == 1:
        ids, g = EmbeddingFunction.rows([u for m in mods for u in tie.uses[m]])
        return ids, g, pads[0]
    ids_l, g_l = [], []
    for m, pad in zip(mods, pads, strict=True):
        ids, g = EmbeddingFunction.rows(tie.uses[m])
        if pad is not None:
            g = torch.where((ids != pad)[..., None], g, 0)
        ids_l.append(ids)
        g_l.append(g)
    return cat_rows(ids_l), cat_rows(g_l), None


def tied_norms(tie: Any) -> dict[int, Tensor]:
    """{id(param): (B,) per-sample squared norm of the summed gradient} for every parameter of ``tie``.

    ``tie`` has .modules, .params and .uses (module -> list of (saved, G)); modules without uses in this
    pass contribute nothing.
    """
    out: dict[int, Tensor] = {}
    for p in tie.params:
        lin_w, lin_b, emb = [], [], []
        for m in tie.modules:
            if not tie.uses.get(m):
                continue
            roles = _roles(m, p)
            kind = _kind(m)
            if kind == "linear" and "weight" in roles:
                lin_w.append(m)
            elif kind == "linear" and "bias" in roles:
                lin_b.append(m)
            elif kind == "embedding" and "weight" in roles:
                emb.append(m)
            elif roles:  # check_tie refuses this; never fall back to an inexact norm
                raise ValueError(f"parameter shared by {tie.names} in an unsupported way: {_HOW}")
        if lin_b:
            _, g = _linear_rows(tie, lin_b)
            out[id(p)] = ops.certified.bias_norms(g)
            continue
        parts: list[Bound] = []
        a = gh = None
        if lin_w:
            a, gh = _linear_rows(tie, lin_w)
            method = ops.linear_norm_method(a.shape[1], a.shape[2], gh.shape[2])
            nh, _ = ops.certified.linear_norms_bound(a, gh, bias=False, method=method)
            parts.append(nh)
            for m in lin_w:
                m.dp_norm_method = f"tied-{method}" + ("+cross" if emb else "")
        cross = None
        if emb:
            ids, ge, pad = _embedding_rows(tie, emb)
            parts.append(ops.certified.embedding_norms_bound(ids, ge, num_embeddings=p.shape[0], padding_idx=pad))
            for m in emb:
                m.dp_norm_method = "tied-index" + ("+cross" if lin_w else "")
            if a is not None and gh is not None:
                cross = ops.certified.embedding_linear_cross_bound(ids, ge, a, gh, padding_idx=pad)
        if parts:
            # ||dE + dH||^2 = ||dE||^2 + ||dH||^2 + 2 <dE, dH>, each term with its rounding bound: the
            # certified total is an upper bound even when dE ~ -dH cancels (ops.certified.tied_total).
            out[id(p)] = ops.certified.tied_total(parts, cross).certified()
    return out
