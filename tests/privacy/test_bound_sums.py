"""Sums of bounds (a grouped conv's groups, a Linear's weight and bias, pruned row blocks) keep n <= value
+ err although the values are signed: a block's value may be far below zero with its err making up for it
(a cancelling sample's computed Gram sum), and the float64 sum of the values then drops a small block's
whole contribution (1 - 2^60 rounds to -2^60)."""

from __future__ import annotations

import torch

from dpkernels.ops.bounds import Bound


def _blocks() -> tuple[Bound, float]:
    """Two blocks of one sample: n_1 = 1 (value 1, exact), n_2 = 0 (value -2^60, err 2^60); n = 1."""
    v = torch.tensor([1.0, -(2.0**60)], dtype=torch.float64)
    e = torch.tensor([0.0, 2.0**60], dtype=torch.float64)
    c = torch.tensor([1.0, 2.0**60], dtype=torch.float64)
    return Bound(v, e, c), 1.0


def test_group_sum_keeps_the_small_block():
    b, n = _blocks()
    naive = Bound(*(t.view(-1, 2).sum(dim=1) for t in b)).certified()
    assert float(naive[0]) < n  # the sum this replaces: the small block is lost
    assert float(b.group_sum(2).certified()[0]) >= n


def test_plus_keeps_the_small_block():
    b, n = _blocks()
    one, two = Bound(*(t[:1] for t in b)), Bound(*(t[1:] for t in b))
    assert float(one.plus(two).certified()[0]) >= n
    assert float(two.plus(one).certified()[0]) >= n


def test_group_sum_is_tight_on_natural_bounds():
    """Non-negative values: the cover costs a few float64 ulps, not a visible inflation."""
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(6, 4, generator=gen, dtype=torch.float64) + 0.5
    b = Bound(v.flatten(), v.flatten() * 1e-4, v.flatten() * 2)
    got = b.group_sum(4).certified()
    want = (v * (1 + 1e-4)).sum(1)
    assert bool(((got / want - 1).abs() < 1e-12).all())


def test_tied_total_keeps_the_norms_beside_a_large_negative_cross_value():
    """||dE||^2 = 1 exactly, ||dH||^2 = 0 with a cross value of -2^59 whose err (2^59) makes up for it."""
    from dpkernels.ops.certified import tied_total

    def one(v, e, c):
        return Bound(*(torch.tensor([x], dtype=torch.float64) for x in (v, e, c)))

    got = tied_total([one(1.0, 0.0, 1.0), one(0.0, 0.0, 0.0)], one(-(2.0**59), 2.0**59, float("inf")))
    assert float(got.certified()[0]) >= 1.0
