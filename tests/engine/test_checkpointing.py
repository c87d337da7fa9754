"""Activation checkpointing: a DP layer whose forward runs again inside the backward pass.

Non-reentrant checkpointing (torch.utils.checkpoint(..., use_reentrant=False)) recomputes only saved
tensors: the step equals the step without checkpointing. Reentrant checkpointing runs the first forward
without grad, so the engine learns of the checkpointed layers only when their backward starts; where their
clipping group was already clipped without them that must be an error naming the layer (their norms would
be left out and their gradients lost), never a silent step, and it must leave the gradients and the
engine as they were.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import dpkernels


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class _Net(nn.Module):
    """A checkpointed block under a DP head: the head's backward runs before the block is recomputed."""

    def __init__(self):
        super().__init__()
        self.blk, self.head = _Block(), nn.Linear(6, 3)
        self.reentrant: bool | None = None  # None: no checkpointing

    def forward(self, x):
        h = self.blk(x) if self.reentrant is None else checkpoint(self.blk, x, use_reentrant=self.reentrant)
        return self.head(h)


def _make(groups="all-layer", strategy="bk", accumulation_steps=1):
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    kw = dict(noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=4.0, seed=1)
    return dpkernels.make_private(
        model, opt, groups=groups, strategy=strategy, accumulation_steps=accumulation_steps, **kw
    )


def _batch(k=0):
    torch.manual_seed(10 + k)
    return torch.randn(5, 6, requires_grad=True), torch.randint(0, 3, (5,))  # reentrant needs a grad input


def _backward(model, opt, k=0):
    x, y = _batch(k)
    opt.backward(nn.functional.cross_entropy(model(x), y))


def _step(model, opt, reentrant, micro=1):
    model.reentrant = reentrant
    opt.zero_grad()
    for k in range(micro):
        _backward(model, opt, k)
    opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "groups,strategy,reentrant",
    [
        ("all-layer", "bk", False),
        ("layer-wise", "bk", False),
        ("layer-wise", "bk", True),  # each block layer is its own group, clipped at the end of the pass
    ],
)
def test_checkpointed_step_equals_plain_step(groups, strategy, reentrant):
    got = _step(*_make(groups, strategy), reentrant=reentrant)
    want = _step(*_make(groups, strategy), reentrant=None)
    assert all(g.abs().sum() > 0 for g in want.values())  # every layer gets a gradient
    for n in want:
        # the same per-sample math on recomputed activations: equal up to float32 summation order
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("reentrant", [False, True])
def test_two_pass_refuses_checkpointing(reentrant):
    """Two-pass would clip the recomputed tensors of its second pass by the norms of its first's (they need not
    be equal: tests/privacy/test_engine_attacks.py): refused by name, nothing written."""
    model, opt = _make("all-layer", "two-pass")
    model.reentrant = reentrant
    with pytest.raises(RuntimeError, match=r"'blk\.[ab]' ran its forward again inside a backward.*strategy='bk'"):
        _backward(model, opt)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("strategy", ["bk"])
def test_reentrant_checkpoint_under_one_group_is_an_error(strategy):
    model, opt = _make("all-layer", strategy)
    model.reentrant = True
    sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    with pytest.raises(RuntimeError, match=r"'blk\.b' .*use_reentrant=False"):
        _backward(model, opt)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, sentinel[n]), f"{n}: gradient changed by a failed backward"
    after = _step(model, opt, reentrant=None)  # the engine is not left half-way
    fresh = _step(*_make("all-layer", strategy), reentrant=None)
    for n in fresh:
        torch.testing.assert_close(after[n], fresh[n], rtol=0, atol=0)


def test_error_after_accumulated_sums_were_replaced_blocks_the_step():
    """One group, two micro-batches: the second fails after the head's sum replaced the first's (no copy is
    kept). The step must refuse, not apply a gradient missing the first micro-batch; then it can be redone."""
    model, opt = _make("all-layer", accumulation_steps=2)
    opt.zero_grad()
    model.reentrant = None
    _backward(model, opt, 0)
    model.reentrant = True
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        _backward(model, opt, 1)
    with pytest.raises(RuntimeError, match="no step was taken: the micro-batches accumulated for it were lost"):
        opt.step()
    again = _step(model, opt, reentrant=None, micro=2)
    fresh = _step(*_make("all-layer", accumulation_steps=2), reentrant=None, micro=2)
    for n in fresh:
        torch.testing.assert_close(again[n], fresh[n], rtol=0, atol=0)
