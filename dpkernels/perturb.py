"""Perturbed clipping (Chen, Wu & Hong 2020, "Understanding Gradient Clipping in Private SGD: A
Geometric Perspective"): each sample's contribution is clipped *after* adding Gaussian noise to it,

    v_i = g_i + k zeta_i,   zeta_i ~ N(0, I) over the parameters of the clipping group,
    n_i = ||v_i||   (a certified float64 upper bound),   c_i = clip_factors(n_i, R_g),
    update_g = sum_i c_i v_i   (+ the Gaussian mechanism's noise, unchanged).

Clipping a symmetric distribution of per-sample gradients keeps the direction of their mean; the
perturbation makes any distribution closer to symmetric, which removes most of the clipping bias at
the cost of extra variance k^2 (the paper's Theorem 5). Privacy is unchanged: ||c_i v_i|| <= R_g for
every sample whatever zeta_i is, so one sample moves the update by at most R_total, as with plain
clipping, and the Gaussian mechanism and its accounting are the same.

Exactness: the same zeta_i enters the norm and the sum. It is never stored for the batch: zeta_i
of parameter p is regenerated from counter-based noise keyed by (engine seed, step, micro-batch,
parameter, rank, sample), as secret as the mechanism's noise seed (neither is ever saved).

How (one generic path for every DP layer type, tied parameters included): sample i's gradient h_i
of each parameter is instantiated by the layer's own ``clipped_sum`` on sample i's slice of the uses
(factor 1, no noise), v_i = h_i + k' zeta_i is formed in float64, and its squared norm is summed in
float64 and rounded up (|fl(sum v^2) - sum v^2| <= gamma_{n+1} sum v^2, plus n underflows of at most
2^-1074 each): an upper bound on the exact norm of the very vector that is summed, so no cross-term
analysis per layer is needed. The sum recomputes v_i the same way (one sample at a time: no B x P
buffer); should a recomputation come out larger than the norm the factor was taken from (a
nondeterministic kernel), that sample's part is shrunk to it, so the bound holds regardless.
In output-gradient units G = g / s (s the engine's loss scale) the engine uses k' = k / s, so that
c_i (h_i + k' zeta_i) = (c_i / s)(g_i + k zeta_i) exactly as with plain clipping.

Cost: B calls of each layer's clipped_sum per pass (twice: norms, sums) and P Gaussian draws per
sample; the ops run on the reference backend whatever backend is chosen (the report says
"perturbed-instantiation"). A layer that did not run in a pass contributes neither g_i nor zeta_i.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .functional._common import trainable
from .ops.bounds import U64, round_up_factor

_TAG = 0x5045525455524221  # separates the zeta streams from the mechanism's noise streams
_SHRINK = 1.0 - 2.0**-50
_CHUNK_ELEMS = 1 << 22  # per-sample vectors of a chunk of samples held at once (float64)


def _mix64(*xs: int) -> int:
    from .engine import _mix64 as mix

    return mix(*xs)


def zeta_seed(seed: int, step: int, micro: int, index: int, rank: int, sample: int) -> int:
    """The seed of zeta_i for parameter number ``index`` of the engine, sample ``sample`` of a micro-batch."""
    return _mix64(seed, _TAG, step, micro, index, rank, sample)


def zeta(shape: torch.Size | tuple[int, ...], seed: int, device: Any) -> Tensor:
    """zeta ~ N(0, I) of ``shape`` in float64 from ``seed`` (the reference's counter-based generator)."""
    return ops.reference.gaussian(shape, seed, device, torch.float64)


def certified_sq_norms(v: Tensor) -> Tensor:
    """(b,) upper bounds on the exact ||v_i||^2 of the rows of a float64 (b, ...) tensor: the squares and
    the sum rounded (relative error <= gamma_{n+1}(2^-53)), and at most 2^-1074 per underflowing square."""
    n = v[0].numel() if v.shape[0] else 0
    s = v.flatten(1).square().sum(1)
    return torch.where(torch.isfinite(s), s * round_up_factor(n + 2) + 2.0 * n * 2.0**-1074, s)


def _slice(obj: Any, i: slice, B: int, where: str) -> Any:
    """Samples ``i`` of what a DP layer saved: every tensor inside has the batch as dimension 0."""
    if isinstance(obj, Tensor):
        if obj.dim() == 0:
            return obj
        if obj.shape[0] != B:
            raise RuntimeError(
                f"perturbed clipping: {where} saved a tensor of shape {tuple(obj.shape)} whose first dimension is "
                f"not the batch ({B}): its per-sample gradients cannot be instantiated. Use perturb_k=0 for it"
            )
        return obj[i]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_slice(x, i, B, where) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(x, i, B, where) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        kw = {f.name: _slice(getattr(obj, f.name), i, B, where) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **kw)
    return obj


class Perturbation:
    """The perturbed-clipping state of an engine: k, and the per-parameter norms between norms and sums."""

    def __init__(self, k: float):
        if not (k >= 0 and math.isfinite(k)):
            raise ValueError(f"perturb_k must be a finite number >= 0, got {k}")
        self.k = float(k)
        self._n2: dict[int, Tensor] = {}  # id(p) -> (B,) certified ||v_i||^2 the factors were taken from

    def clear(self) -> None:
        self._n2.clear()

    # ------------------------------------------------------------------ per-sample vectors
    def _instances(self, engine: Any, tie: Any, lo: int, hi: int, B: int, want: set[int]) -> dict[int, Tensor]:
        """{id(p): (hi - lo, *p.shape) float64} for p in ``want``: samples lo..hi-1's gradients (G units),
        summed over the modules that share p."""
        from .engine import SumSpec, dp_function
        from .functional.linear import LinearFunction

        out: dict[int, Tensor] = {}
        for m in tie.modules:
            uses = tie.uses.get(m)
            if not uses:
                continue
            ps = [p for p in m.parameters(recurse=False) if id(p) in want]
            if not ps:
                continue
            where = f"DP layer {engine._name_of.get(m, type(m).__name__)!r}"
            fn = dp_function(m)
            if fn is LinearFunction:  # sum_t g_t a_t^T for the chunk at once
                a, g = LinearFunction._rows(
                    [(_slice(s, slice(lo, hi), B, where), _slice(g, slice(lo, hi), B, where)) for s, g in uses]
                )
                res = {}
                w, b = trainable(m, "weight"), trainable(m, "bias")
                if w is not None:
                    res[id(w)] = torch.einsum("btp,btd->bpd", g.to(torch.float64), a.to(torch.float64))
                if b is not None:
                    res[id(b)] = g.to(torch.float64).sum(1)
            else:  # any layer: its own clipped_sum on one sample's slice of the uses, factor 1, no noise
                c = torch.ones(1, dtype=torch.float64, device=uses[0][1].device)
                rows: dict[int, list[Tensor]] = {}
                for i in range(lo, hi):
                    one = [
                        (_slice(s, slice(i, i + 1), B, where), _slice(g, slice(i, i + 1), B, where)) for s, g in uses
                    ]
                    for pid, t in fn.clipped_sum(m, one, {id(p): SumSpec(c=c) for p in ps}).items():
                        rows.setdefault(pid, []).append(t.to(torch.float64))
                res = {pid: torch.stack(r) for pid, r in rows.items()}
            for pid, t in res.items():
                if pid in want:
                    out[pid] = out[pid] + t if pid in out else t
            m.dp_norm_method = "perturbed-instantiation"
        return out

    def _vectors(self, engine: Any, p: nn.Parameter, lo: int, h: Tensor, kp: float) -> Tensor:
        """v_i = h_i + k' zeta_i for the chunk's samples (float64)."""
        idx = engine._index[id(p)]
        z = [
            zeta(h.shape[1:], zeta_seed(engine.seed, engine.stream, engine._micro, idx, engine.rank, lo + j), h.device)
            for j in range(h.shape[0])
        ]
        return h + kp * torch.stack(z)

    def _k(self, engine: Any) -> float:
        return self.k / engine.loss_scale()

    @staticmethod
    def _batch(tie: Any) -> int:
        return next(g.shape[0] for uses in tie.uses.values() for _, g in uses)

    @staticmethod
    def _chunks(params: list[nn.Parameter], B: int):
        step = max(1, _CHUNK_ELEMS // max(1, sum(p.numel() for p in params)))
        for lo in range(0, B, step):
            yield lo, min(B, lo + step)

    # ------------------------------------------------------------------ the engine's two calls
    def norms(self, engine: Any, tie: Any) -> dict[int, Tensor]:
        """{id(p): (B,) certified ||h_i + k' zeta_i||^2} for the tie's parameters (G units, as tie_norms)."""
        B = self._batch(tie)
        kp = self._k(engine)
        want = {id(p) for p in tie.params}
        rows: dict[int, list[Tensor]] = {}
        with ops.use_backend("reference"):
            for lo, hi in self._chunks(tie.params, B):
                h = self._instances(engine, tie, lo, hi, B, want)
                for p in tie.params:
                    if id(p) in h:
                        rows.setdefault(id(p), []).append(
                            certified_sq_norms(self._vectors(engine, p, lo, h[id(p)], kp))
                        )
        out = {pid: torch.cat(r) for pid, r in rows.items()}
        self._n2.update(out)
        return out

    def sum_params(self, engine: Any, tie: Any, params: list[nn.Parameter], last: bool) -> None:
        """The engine's _sum_params for perturbed clipping: sum_i c_i v_i per parameter, then prev, noise, scale."""
        todo = []
        for p in params:
            tie.summed.add(id(p))
            if engine._factors[engine._group_of[id(p)]] is not None and id(p) in self._n2:
                todo.append(p)
        if not todo:
            return
        B = self._batch(tie)
        kp = self._k(engine)
        want = {id(p) for p in todo}
        totals = {id(p): torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in todo}
        with ops.use_backend("reference"):
            for lo, hi in self._chunks(todo, B):
                h = self._instances(engine, tie, lo, hi, B, want)
                for p in todo:
                    if id(p) not in h:
                        continue
                    v = self._vectors(engine, p, lo, h[id(p)], kp)
                    c = engine._factors[engine._group_of[id(p)]][lo:hi].to(torch.float64)
                    # the factor was taken from n2; a recomputation that came out larger is shrunk to it
                    n2, again = self._n2[id(p)][lo:hi], v.flatten(1).square().sum(1)
                    c = torch.where(again > n2, c * (n2 / again).sqrt() * _SHRINK, c)
                    totals[id(p)].add_(torch.einsum("b,b...->...", c, v))
            for p in todo:
                self._n2.pop(id(p), None)
                spec = engine._spec(p, last, engine._prev(p))
                acc = ops.acc_dtype(p)
                base = totals[id(p)] if spec.prev is None else totals[id(p)] + spec.prev.to(torch.float64)
                out = ops.add_noise(
                    base.to(acc), p.shape, noise_std=spec.noise_std, scale=spec.scale, seed=spec.seed,
                    device=p.device, dtype=acc,
                )  # fmt: skip
                engine._store(p, out, last)


__all__ = ["Perturbation", "zeta", "zeta_seed", "certified_sq_norms", "U64"]
