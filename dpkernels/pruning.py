"""Magnitude pruning for DP training: fixed masks whose pruned coordinates get no gradient and no noise.

    masks = magnitude_masks(model, sparsity=0.9)           # from the model's (public) initial weights
    apply_masks(model, masks)                               # zeroes the pruned weights, marks them
    model, optimizer = make_private(model, optimizer, ...)  # before or after apply_masks: both work

Where a mask may come from. A mask is released with the model (the zero pattern of the weights shows
it), and no noise protects it: a mask computed from the private data (its gradients, activations, or a
model trained on it without DP) is a release of that data outside the privacy account. So masks come
from public information only: the initial weights (drawn before any data is seen), weights pre-trained
on public data, or weights released by DP training (the DP-SGD account covers every iterate, so
pruning them, during or after training, is post-processing). `magnitude_masks` reads nothing but the
weights it is given; where those weights came from is the caller's responsibility.

What the engine does with a parameter's mask m (a 0/1 tensor of the parameter's shape):

    per-sample norm  ||m * g_i||^2             (only the kept coordinates count)
    gradient         scale * m * (prev + sum_i c_i g_i + sigma R_total z)

so pruned coordinates get exactly 0 (no gradient, no noise: SGD, momentum and Adam leave them where
they are; zero weights stay zero under weight decay too), and each sample's clipped contribution
c_i m * g_i still has norm <= R, because c_i comes from the certified norm of m * g_i: the
sensitivity, and so the privacy account, is the same as without pruning. The noise on the kept
coordinates has the usual std sigma R_total (/ expected_batch_size for a mean loss).

How the masked norms are computed, per layer (certified upper bounds in float64, see
dpkernels/ops/bounds.py):

- Linear, Conv (groups = 1), *structured* masks, m = r c^T with r over output units/channels and c over
  (unfolded) input columns: the ghost or instantiation rule (whichever costs fewer FLOPs) on the
  sliced G[:, :, r] and A[:, :, c], exact for the masked norm since (G^T A)[r, c] = G[:, r]^T A[:, c].
- Linear, Conv, any other (unstructured) mask: there is no ghost identity for ||m * G^T A||; the
  per-sample gradients are instantiated in chunks of samples, masked and squared (the reference's
  certified instantiation with the mask applied before the squares, ops.reference.bounds._inst).
  With one token per sample (T = 1: an MLP on tables) the rank-1 identity
  ||m * g a^T||^2 = (g^2)^T m (a^2) needs one GEMM and no per-sample matrix (`_rank1`).
- Embedding, any mask: the table's gradient row v is sum_{t: x_t = v} g_t, so masking it is masking
  each token's g_t with m[x_t]; the embedding norm runs on the masked G (repeated tokens stay exact).
- Biases: a bias mask slices G's columns (a bias is a 1-d "row" mask).

Masks on other layers (norm layers, attention, RNNs, tapped parameters) and on parameters shared by
several layers are refused, naming the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .functional._common import trainable
from .functional.conv import ConvFunction
from .functional.embedding import EmbeddingFunction
from .functional.linear import LinearFunction
from .ops.bounds import (
    F64,
    U64,
    Bound,
    from_norm_error,
    gamma,
    pow2_scale,
    round_up_factor,
    scale_rows,
    token_norms,
    underflow_eta,
)
from .ops.reference._common import _CHUNK_ELEMS
from .ops.reference.bounds import _inst

__all__ = ["Mask", "apply_masks", "magnitude_masks", "mask_of", "remove_masks", "sparsity_of"]

_TORCH_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Linear, "linear"),
    (nn.Conv1d, "conv"),
    (nn.Conv2d, "conv"),
    (nn.Conv3d, "conv"),
    (nn.Embedding, "embedding"),
)
_FUNCTION_KINDS = {LinearFunction: "linear", ConvFunction: "conv", EmbeddingFunction: "embedding"}
_SUPPORTED = "nn.Linear, nn.Conv1d/2d/3d and nn.Embedding (or their DP twins)"
STRUCTURES = (False, "rows")
SCOPES = ("layer", "global")


@dataclass(frozen=True, eq=False)
class Mask:
    """A parameter's pruning mask. ``keep``: bool, the parameter's shape. Seen as a matrix (dim 0 by the
    other dims flattened), it is *structured* when it is rows x columns (keep[o, j] = r[o] and c[j]); then
    ``rows``/``cols`` are the kept indices (None: all kept) and norms keep the ghost rule by slicing.

    The engine reads a private copy (``to``): norms (from rows/cols) and sums (from keep) must see one mask,
    or a sample's kept coordinates could exceed the ones its norm counted. An in-place edit of the public
    tensors is refused at the next use (their version counters); one the counters miss (``.data``, numpy)
    is ignored. To change a mask, call apply_masks again."""

    keep: Tensor
    rows: Tensor | None
    cols: Tensor | None
    structured: bool
    _private: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self._private:
            return
        cl = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        for f in ("keep", "rows", "cols"):  # fresh tensors: version 0 until someone writes into them
            object.__setattr__(self, f, cl(getattr(self, f)))
        snap = Mask(self.keep.detach().clone(), cl(self.rows), cl(self.cols), self.structured, True)
        object.__setattr__(self, "_snap", snap)

    @staticmethod
    def of(keep: Tensor) -> Mask:
        keep = keep.detach().to(torch.bool).clone()
        k2 = keep.reshape(keep.shape[0], -1) if keep.dim() > 0 else keep.reshape(1, 1)
        r, c = k2.any(dim=1), k2.any(dim=0)
        structured = bool(torch.equal(k2, r[:, None] & c[None, :]))
        rows = None if bool(r.all()) else r.nonzero().flatten()
        cols = None if bool(c.all()) else c.nonzero().flatten()
        return Mask(keep, rows, cols, structured)

    def to(self, device: torch.device) -> Mask:
        """The engine's view: the private copy on ``device`` (an edited public tensor: ValueError)."""
        if not self._private:
            edited = [f for f in ("keep", "rows", "cols") if (t := getattr(self, f)) is not None and t._version]
            if edited:
                raise ValueError(
                    f"a pruning mask of shape {tuple(self.keep.shape)} had its {edited} edited in place after "
                    f"apply_masks: its norms and sums would disagree. To change a mask, call "
                    f"dpkernels.pruning.apply_masks(model, {{name: new_keep}}) again"
                )
            return self._snap.to(device)  # type: ignore[attr-defined]
        if self.keep.device == device:
            return self
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Mask(self.keep.to(device), mv(self.rows), mv(self.cols), self.structured, True)

    def empty(self) -> bool:
        """Nothing kept."""
        return (self.rows is not None and self.rows.numel() == 0) or (self.cols is not None and self.cols.numel() == 0)


def mask_of(module: nn.Module, name: str) -> Mask | None:
    """The mask `apply_masks` put on ``module``'s parameter ``name``, or None. Masks live in the module's
    ``_dp_masks`` dict: they survive deepcopy, pickling and make_private's conversion (a copied module
    keeps them; a copied Parameter would not)."""
    return module.__dict__.get("_dp_masks", {}).get(name)


def _kind(module: nn.Module) -> str | None:
    """The kind ("linear", "conv", "embedding") of the layers masks are supported on (exact types or DP twins)."""
    fn = getattr(type(module), "dp_function", None)
    if fn is not None:
        kind = _FUNCTION_KINDS.get(fn)
        torch_layer = getattr(type(module), "torch_layer", None)
        return kind if torch_layer in {t for t, _ in _TORCH_KINDS} else None
    for t, kind in _TORCH_KINDS:
        if type(module) is t:
            return kind
    return None


def _owners(model: nn.Module) -> dict[int, list[tuple[str, str, nn.Module]]]:
    """id(param) -> [(module name, attribute, module)] for every module holding it directly."""
    out: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for k, p in m._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mname, k, m))
    return out


# ----------------------------------------------------------------------------- choosing masks


def _prunable(model: nn.Module, include: Iterable[str] | None) -> list[tuple[str, nn.Module]]:
    mods = dict(model.named_modules())
    if include is None:
        return [
            (n, m) for n, m in mods.items() if _kind(m) in ("linear", "conv") and trainable(m, "weight") is not None
        ]
    out = []
    for n in include:
        if n not in mods:
            raise ValueError(
                f"magnitude_masks: the model has no module {n!r} (include names modules, e.g. '0' or 'fc1')"
            )
        if _kind(mods[n]) is None:
            raise ValueError(
                f"magnitude_masks: module {n!r} is a {type(mods[n]).__name__}; masks are supported on {_SUPPORTED}"
            )
        out.append((n, mods[n]))
    return out


def _weight(m: nn.Module) -> Tensor:
    w = m._parameters.get("weight")
    if w is None:
        raise ValueError(f"magnitude_masks: {type(m).__name__} has no weight")
    return w


def _smallest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the k smallest scores (ties broken by position: stable)."""
    drop = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        drop[torch.sort(scores.flatten(), stable=True).indices[:k]] = True
    return drop.view(scores.shape)


@torch.no_grad()
def magnitude_masks(
    model: nn.Module,
    sparsity: float,
    *,
    structured: bool | str = False,
    scope: str = "layer",
    include: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Masks {parameter name: bool tensor, True = kept} pruning the smallest-magnitude weights of ``model``.

    ``model`` must hold *public* weights (its initial weights, public pre-trained ones, or weights
    released by DP training): the masks are a function of them and nothing else (see the module docstring).

    sparsity: the fraction pruned, in [0, 1): floor(sparsity * n) of each layer's n scores (scope="layer")
        or of all layers' scores together (scope="global", one threshold).
    structured: False prunes single weights by |w|; "rows" prunes whole output units (Linear) or output
        channels (Conv) by the RMS of their row, sqrt(mean_j w_oj^2), and the bias entries of the pruned
        rows with them. Row masks keep the ghost norm (slicing); single-weight masks need instantiation.
        The rows of an output layer are its outputs (a classifier's classes): name the hidden layers in
        ``include`` for row pruning.
    include: names of the modules to prune; default every Linear and Conv layer with a trainable weight
        (Embedding tables only when named).
    """
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"magnitude_masks: sparsity must be in [0, 1), got {sparsity}")
    if structured not in STRUCTURES:
        raise ValueError(f"magnitude_masks: structured must be one of {STRUCTURES}, got {structured!r}")
    if scope not in SCOPES:
        raise ValueError(f"magnitude_masks: scope must be one of {SCOPES}, got {scope!r}")
    layers = _prunable(model, include)
    scores: list[Tensor] = []
    for _, m in layers:
        w = _weight(m).detach().to("cpu", torch.float64)
        scores.append(w.reshape(w.shape[0], -1).square().mean(dim=1).sqrt() if structured else w.abs())
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores]) if scores else torch.zeros(0)
        drops = list(_smallest(flat, math.floor(sparsity * flat.numel())).split([s.numel() for s in scores]))
        drops = [d.view(s.shape) for d, s in zip(drops, scores, strict=True)]
    else:
        drops = [_smallest(s, math.floor(sparsity * s.numel())) for s in scores]
    out: dict[str, Tensor] = {}
    for (name, m), drop in zip(layers, drops, strict=True):
        prefix = f"{name}." if name else ""
        w = _weight(m)
        keep = ~drop
        if structured:
            out[prefix + "weight"] = keep.view(-1, *([1] * (w.dim() - 1))).expand(w.shape).clone()
            if trainable(m, "bias") is not None:
                out[prefix + "bias"] = keep.clone()
        else:
            out[prefix + "weight"] = keep
    return out


# ----------------------------------------------------------------------------- attaching masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor], *, zero: bool = True) -> nn.Module:
    """Attach ``masks`` ({parameter name: bool tensor of its shape, True = kept}) to ``model``'s parameters
    for DP training (before or after make_private), and with ``zero`` set the pruned weights to 0.

    Replaces any mask a parameter had. Masks are accepted on the weights and biases of nn.Linear,
    nn.Conv1d/2d/3d and nn.Embedding layers (or their DP twins), never on a parameter shared by several
    layers. Pruned coordinates keep their value through training (their gradient is exactly 0): with
    zero=False and weight decay, they still decay."""
    params = dict(model.named_parameters(remove_duplicate=False))
    owners = _owners(model)
    for name, keep in masks.items():
        if name not in params:
            raise ValueError(f"apply_masks: the model has no parameter {name!r}")
        p = params[name]
        where = owners[id(p)]
        if len({id(m) for _, _, m in where}) > 1:
            mods = ", ".join(repr(n) for n, _, _ in where)
            raise ValueError(
                f"apply_masks: parameter {name!r} is shared by modules {mods}: masks on shared (tied) parameters are "
                f"not supported. Untie them, or leave that parameter unmasked"
            )
        mname, attr, m = where[0]
        if _kind(m) is None or attr not in ("weight", "bias"):
            raise ValueError(
                f"apply_masks: parameter {name!r} belongs to {type(m).__name__} {mname!r}: masks are supported on the "
                f"weight and bias of {_SUPPORTED} only. Leave it out of the masks"
            )
        if not isinstance(keep, Tensor) or tuple(keep.shape) != tuple(p.shape):
            shape = tuple(keep.shape) if isinstance(keep, Tensor) else type(keep).__name__
            raise ValueError(f"apply_masks: the mask of {name!r} has shape {shape}, the parameter {tuple(p.shape)}")
        if keep.dtype != torch.bool and not bool(((keep == 0) | (keep == 1)).all()):
            raise ValueError(f"apply_masks: the mask of {name!r} must be boolean or 0/1 (True/1 = kept)")
        mask = Mask.of(keep.to(p.device))
        m.__dict__.setdefault("_dp_masks", {})[attr] = mask
        if zero:
            p.masked_fill_(~mask.keep, 0)
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Forget every mask on the model's parameters (the weights keep their values)."""
    for m in model.modules():
        m.__dict__.pop("_dp_masks", None)
    return model


def sparsity_of(model: nn.Module) -> float:
    """The fraction of the masked parameters' coordinates that are pruned (0.0 with no masks)."""
    n = kept = 0
    for mod in model.modules():
        for m in mod.__dict__.get("_dp_masks", {}).values():
            n += m.keep.numel()
            kept += int(m.keep.sum())
    return 1.0 - kept / n if n else 0.0


# ----------------------------------------------------------------------------- what the engine calls


def has_masks(module: nn.Module) -> bool:
    return bool(module.__dict__.get("_dp_masks"))


def masked_grad(module: nn.Module, name: str, out: Tensor) -> Tensor:
    """``out`` with the pruned coordinates of ``module``'s parameter ``name`` set to exactly 0 (no mask: ``out``)."""
    m = mask_of(module, name)
    return out if m is None else torch.where(m.to(out.device).keep, out, 0)


def refuse_tied(names: list[str], modules: list[nn.Module]) -> None:
    if any(has_masks(m) for m in modules):
        raise ValueError(
            f"modules {names} share a parameter that has a pruning mask: masks on shared (tied) parameters are not "
            f"supported. dpkernels.pruning.remove_masks, or untie them"
        )


def refuse_perturbed(names: list[str], modules: list[nn.Module]) -> None:
    if any(has_masks(m) for m in modules):
        raise ValueError(
            f"modules {names} have pruning masks and the engine clips perturbed gradients (perturb_k): the two are "
            f"not combined yet (the perturbation would reach the pruned coordinates). Use perturb_k=0, or "
            f"dpkernels.pruning.remove_masks"
        )


def _zeros(B: int, device: torch.device) -> Tensor:
    return torch.zeros(B, device=device, dtype=torch.float64)


def _certify(bounds: list[Bound], groups: int) -> Tensor:
    """Row-block bounds (B * groups) -> certified per-sample norms, the groups' blocks summed (disjoint)."""
    b = Bound(*(torch.cat([getattr(x, f) for x in bounds]) for f in Bound._fields))
    return (b if groups == 1 else b.group_sum(groups)).certified()


def _rows_norms(module: Any, a: Tensor, g: Tensor, mask: Mask) -> Tensor:
    """Certified ||mask * G_i^T A_i||^2 for Linear-shaped rows a (B, T, d), g (B, T, p) (groups = 1)."""
    B = a.shape[0]
    if mask.empty() or B == 0:
        module.dp_norm_method = "masked-empty"
        return _zeros(B, a.device)
    if mask.structured:
        a_s = a if mask.cols is None else a.index_select(2, mask.cols)
        g_s = g if mask.rows is None else g.index_select(2, mask.rows)
        method = ops.linear_norm_method(a_s.shape[1], a_s.shape[2], g_s.shape[2])
        module.dp_norm_method = f"sliced-{method}"
        nw, _ = ops.certified.linear_norms(a_s, g_s, bias=False, method=method)
        return nw
    if a.shape[1] == 1:  # one token per sample (an MLP on tables): the rank-1 identity, one GEMM
        module.dp_norm_method = "masked-rank1"
        M = mask.keep.reshape(g.shape[2], a.shape[2]).to(torch.float64)
        step = max(1, _CHUNK_ELEMS // max(1, 4 * (a.shape[2] + g.shape[2])))
        return torch.cat([_rank1(a[s : s + step, 0], g[s : s + step, 0], M) for s in range(0, B, step)])
    module.dp_norm_method = "masked-inst"
    keep = mask.keep.reshape(1, g.shape[2], a.shape[2])
    step = max(1, _CHUNK_ELEMS // max(1, 2 * keep.numel() + a.shape[1] * (a.shape[2] + g.shape[2])))
    return _certify([_inst(a[s : s + step], g[s : s + step], keep) for s in range(0, B, step)], 1)


def _rank1(a: Tensor, g: Tensor, M: Tensor) -> Tensor:
    """Certified ||M * g_i a_i^T||^2 = sum_{o,j} M_oj g_io^2 a_ij^2 for one token per sample; a (B, d), g (B, p).

    Each sample's a_i, g_i are scaled by powers of two s (max |entry| in [1/2, 1), `pow2_scale`) and
    squared in float64, value = sum_j ((G^2 M)_j A_j^2): non-negative terms only, so no cancellation;
    relative error <= gamma_{p+d+4}(2^-53) (squares, a length-p and a length-d sum). Absolute error
    from underflow (float64 inputs only: float32 squares are exact in float64) <= eta (2 p d + d), and
    scaling float64 entries into the subnormal range moves the norm by <= 2 eta sqrt(p d) (as in _inst).
    Bounded via `from_norm_error`, capped by |a_i| |g_i| (the triangle inequality), then unscaled."""
    p, d = g.shape[1], a.shape[1]
    sa, sg = pow2_scale(a, F64), pow2_scale(g, F64)
    A, G = scale_rows(a, sa, F64), scale_rows(g, sg, F64)
    value = ((G.square() @ M) * A.square()).sum(dim=1)
    eta = underflow_eta(F64)
    delta = 2.0 * eta * math.sqrt(p * d)
    abs_norm = math.sqrt(eta * (2 * p * d + d) * round_up_factor(4)) + delta
    cap = token_norms(A[:, None]).flatten() * token_norms(G[:, None]).flatten() * round_up_factor(4)
    b = from_norm_error(value, gamma(p + d + 4, U64), torch.full_like(value, abs_norm), cap + delta)
    return Bound(*(t / (sa * sg).square() for t in b)).certified()


def _bias_norms(g: Tensor, mask: Mask | None) -> Tensor:
    """Certified ||m * sum_t g_t||^2 from rows g (B, T, p)."""
    if mask is not None:
        if mask.empty():
            return _zeros(g.shape[0], g.device)
        if mask.rows is not None:
            g = g.index_select(2, mask.rows)
    return ops.certified.bias_norms(g)


def _linear_norms(module: Any, uses: list) -> dict[int, Tensor]:
    a, g = LinearFunction._rows(uses)
    w, b = trainable(module, "weight"), trainable(module, "bias")
    out: dict[int, Tensor] = {}
    if w is not None:
        mw = mask_of(module, "weight")
        if mw is None:
            method = ops.linear_norm_method(a.shape[1], a.shape[2], g.shape[2])
            module.dp_norm_method = method
            out[id(w)], _ = ops.certified.linear_norms(a, g, bias=False, method=method)
        else:
            out[id(w)] = _rows_norms(module, a, g, mw.to(a.device))
    if b is not None:
        mb = mask_of(module, "bias")
        out[id(b)] = _bias_norms(g, None if mb is None else mb.to(g.device))
    return out


def _conv_norms(module: Any, uses: list) -> dict[int, Tensor]:
    w, b = trainable(module, "weight"), trainable(module, "bias")
    s0, g0 = uses[0]
    B, groups, dev = g0.shape[0], s0.groups, g0.device
    out: dict[int, Tensor] = {}
    if w is not None:
        mw = mask_of(module, "weight")
        if mw is None:
            out.update({k: v for k, v in ConvFunction.norms(module, uses).items() if k == id(w)})
        elif groups == 1:  # the Linear view: unfolded rows of every use, concatenated along T, per chunk
            mw = mw.to(dev)
            d = math.prod(w.shape[1:])
            T = sum(math.prod(g.shape[2:]) for _, g in uses)
            step = max(1, _CHUNK_ELEMS // max(1, 2 * T * (d + w.shape[0]) + 2 * w.numel()))
            parts = [_zeros(0, dev)]
            for s in range(0, B, step):
                rows = [ops.reference.conv_rows(sv.x[s : s + step], g[s : s + step], **sv.geometry()) for sv, g in uses]
                a, gr = torch.cat([r[0] for r in rows], 1), torch.cat([r[1] for r in rows], 1)
                parts.append(_rows_norms(module, a, gr, mw))
            out[id(w)] = torch.cat(parts)
        else:  # grouped: each (sample, group) block masked by its group's slice of the mask
            keep = mw.to(dev).keep.reshape(groups, w.shape[0] // groups, -1)
            module.dp_norm_method = "masked-inst"
            T = sum(math.prod(g.shape[2:]) for _, g in uses)
            step = max(1, _CHUNK_ELEMS // max(1, 2 * T * math.prod(w.shape[1:]) * groups + 2 * w.numel()))
            bounds: list[Bound] = []
            for s in range(0, B, step):
                rows = [ops.reference.conv_rows(sv.x[s : s + step], g[s : s + step], **sv.geometry()) for sv, g in uses]
                a, gr = torch.cat([r[0] for r in rows], 1), torch.cat([r[1] for r in rows], 1)
                bounds.append(_inst(a, gr, keep))
            out[id(w)] = _certify(bounds, groups) if bounds else _zeros(0, dev)
    if b is not None:
        gs = [g.flatten(2).transpose(1, 2) for _, g in uses]
        mb = mask_of(module, "bias")
        out[id(b)] = _bias_norms(gs[0] if len(gs) == 1 else torch.cat(gs, 1), None if mb is None else mb.to(dev))
    return out


def _embedding_norms(module: Any, uses: list) -> dict[int, Tensor]:
    w = trainable(module, "weight")
    if w is None or not uses:
        return {}
    ids, g = EmbeddingFunction.rows(uses)
    mw = mask_of(module, "weight")
    if mw is not None:
        keep = mw.to(g.device).keep
        # row v of sample i's gradient is sum_{t: x_t = v} g_t, so m * (that row) = sum_t m[x_t] * g_t; ids out
        # of range were refused by F.embedding in forward (clamped here only so that the lookup cannot fail)
        g = torch.where(keep[ids.clamp(0, keep.shape[0] - 1)], g, 0)
    module.dp_norm_method = "masked-index"
    return {
        id(w): ops.certified.embedding_norms(
            ids, g, num_embeddings=module.num_embeddings, padding_idx=module.padding_idx
        )
    }


_NORMS = {"linear": _linear_norms, "conv": _conv_norms, "embedding": _embedding_norms}


class MaskedFunction:
    """The ``norms``/``clipped_sum`` of a DP layer with masked parameters (what `engine.dp_function` returns).

    norms: the certified norms of the kept coordinates (module docstring). clipped_sum: the layer's own
    clipped sum without prev, noise or scale, then scale * m * (prev + sum + noise_std z), z ~ N(0, I) from
    the parameter's seed: the noise drawn for the kept coordinates only matters, the pruned ones are 0."""

    def __init__(self, base: Any, kind: str):
        self.base, self.kind = base, kind

    def norms(self, module: Any, uses: list) -> dict[int, Tensor]:
        return _NORMS[self.kind](module, uses)

    def clipped_sum(self, module: Any, uses: list, specs: dict[int, Any]) -> dict[int, Tensor]:
        masked = {id(p): m for k, p in module._parameters.items() if (m := mask_of(module, k)) is not None}
        # every parameter's epilogue here (a layer's op may serve weight and bias in one call with one scale)
        inner = {k: replace(s, prev=None, noise_std=0.0, scale=1.0) for k, s in specs.items()}
        out = self.base.clipped_sum(module, uses, inner)
        for k in list(out):
            s, r = specs[k], out[k]
            if s.prev is not None:
                r = r + s.prev.to(r.dtype)
            if s.noise_std != 0.0:
                r = r + ops.add_noise(
                    None, r.shape, noise_std=s.noise_std, scale=1.0, seed=s.seed, device=r.device, dtype=r.dtype
                )
            if s.scale != 1.0:
                r = r * s.scale
            mask = masked.get(k)
            out[k] = r if mask is None else torch.where(mask.to(r.device).keep, r, 0)
        return out


def masked_function(module: nn.Module, base: Any) -> MaskedFunction:
    """The masked norms and sums for ``module`` (which has masked parameters), or a ValueError naming it."""
    kind = _FUNCTION_KINDS.get(base)
    if kind is None or getattr(type(module), "torch_layer", None) not in {t for t, _ in _TORCH_KINDS}:
        names = sorted(module.__dict__.get("_dp_masks", {}))
        raise ValueError(
            f"{getattr(module, '_dp_name', lambda: type(module).__name__)()} has pruning masks on {names}: masks are "
            f"supported on {_SUPPORTED} only. dpkernels.pruning.remove_masks, or leave that layer out of the masks"
        )
    return MaskedFunction(base, kind)
