"""Attacks on the engine's hot path through the public API: clip factors at the edges of their dtype.

A clip factor c_i (times the loss scale, `dpkernels.engine.factors_in`) is handed to the layers in the
dtype they sum in. Whatever its value, the contribution c_i g_i of one sample must stay of norm <= R_g:
a factor that overflows to inf turns a sample with a zero (or tiny) gradient into inf * 0 = NaN in the
whole sum, so that one sample decides whether the step is finite (unbounded sensitivity).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dpkernels


def _update(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, **kw) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).to(dtype)
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, expected_batch_size=2.0, seed=0, **kw
    )
    ((model(x.to(dtype)) - y.to(dtype)) ** 2).sum(1).mean().backward()
    opt.step()
    return model[0].weight.grad.to(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kw",
    [
        # automatic clipping: c = R / (n + gamma) = R / gamma for a zero gradient, 1e40 here
        dict(clipping="automatic", gamma=1e-40, max_grad_norm=1.0),
        dict(clipping="automatic", gamma=1e-300, max_grad_norm=1e10),  # 1e310: past float64 too
    ],
    ids=["past-float32", "past-float64"],
)
def test_a_factor_past_the_dtype_range_never_poisons_the_step(dtype, kw):
    """Sample 1 has a zero gradient (zero input, no bias): its factor is huge. The step with it must be
    finite and within R / E of the step without it (exact here: its contribution is 0)."""
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    y = torch.zeros(2, 2)
    both = _update(x, y, dtype, **kw)
    alone = _update(x[:1], y[:1], dtype, **kw)
    assert torch.isfinite(both).all(), f"one zero-gradient sample made the update {both}"
    R = kw["max_grad_norm"]
    # the zero sample adds nothing; 1e-6 relative: the two runs' sums differ only in the mean's 1/B rounding
    assert (both - alone).norm().item() * 2.0 <= R * (1 + 1e-6) + math.ulp(R)


class _MixedDtypes(nn.Module):
    """One clipping group (all-layer) over a float64 layer and a float32 layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4).double()
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x.double()).float())


def test_factors_reach_each_layer_in_its_summing_dtype(monkeypatch):
    """The factors of a group are rounded down once, in the dtype its layers sum in: a layer summing in
    float32 that is handed float64 factors rounds them to nearest (up to 2^-24 relative above c_i, so
    c_i ||g_i|| may exceed R_g). A group mixing float64 and float32 layers must hand both float32 factors
    (exact in float64), never float64 ones to the float32 layer."""
    from dpkernels import ops

    seen: list[tuple[torch.dtype, torch.dtype]] = []
    raw = ops.linear_clipped_sum

    def spy(a, g, c, **kw):
        seen.append((ops.acc_dtype(a, g), c.dtype))
        return raw(a, g, c, **kw)

    monkeypatch.setattr(ops, "linear_clipped_sum", spy)
    torch.manual_seed(0)
    model = _MixedDtypes()
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4.0, seed=0,
    )  # fmt: skip
    model(torch.randn(4, 3) * 1e3).square().sum().backward()
    opt.step()
    assert {acc for acc, _ in seen} == {torch.float32, torch.float64}, seen
    for acc, c in seen:
        # float32 factors in a float64 sum are exact; float64 ones in a float32 sum are rounded to nearest
        assert c == torch.float32 or acc == torch.float64, f"a layer summing in {acc} got {c} clip factors"


def test_subnormal_factors_are_never_rounded_up():
    """R_g / n_i below the smallest normal float64 (a tiny bound, a sample with a huge gradient) is rounded
    in absolute steps of 2^-1074: 2.51 * 2^-1074 becomes 3 * 2^-1074, and the sample moves the update by
    up to ~1.9 R (measured on main: 1.876 R over these inputs). Such a factor must be 0 (the sample
    dropped), never rounded up."""
    R = 1e-170
    worst = 0.0
    for k in range(40):  # c_i = R / ||g_i|| ~ 1e-323 .. 3e-324 over these inputs: a few subnormal steps
        model = nn.Linear(1, 1, bias=False).double()
        with torch.no_grad():
            model.weight.fill_(0.5)
        model, opt = dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=R,
            expected_batch_size=1.0, seed=0, loss_reduction="sum",
        )  # fmt: skip
        x = torch.tensor([[3e76 * (1 + k / 37.0)]], dtype=torch.float64)  # ||g_i|| = x^2 ~ 1e153
        model(x).square().sum().backward()
        opt.step()
        worst = max(worst, model.weight.grad.abs().item() / R)
    # one sample, float64: its update is c_i g_i up to a few roundings of 2^-53 each
    assert worst <= 1 + 1e-12, f"one sample moved the update by {worst} R"


class _RecomputedDropout(nn.Module):
    """A DP layer inside an activation checkpoint whose recomputation is not the forward's
    (preserve_rng_state=False: another dropout mask; on a GPU, any non-deterministic op does the same)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 1)

    def block(self, x):
        return self.a(nn.functional.dropout(x, 0.9, training=True))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.b(checkpoint(self.block, x, use_reentrant=False, preserve_rng_state=False))


def test_two_pass_refuses_a_forward_recomputed_between_its_passes():
    """Two-pass clips the clipping pass's (A, G) by the norms pass's norms; a checkpointed forward recomputed
    differently in the two passes (here dropout with preserve_rng_state=False) moved one sample's update by
    28.8 R. A recomputation inside a two-pass backward is refused before anything is summed; the engine is
    left usable and no gradient is written."""
    torch.manual_seed(0)
    model = _RecomputedDropout()
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0,
        expected_batch_size=1.0, seed=0, strategy="two-pass", loss_reduction="sum",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"'a' ran its forward again inside a backward.*strategy='bk'"):
        opt.backward(model(torch.randn(1, 8) * 100).sum() * 100)
    assert all(p.grad is None for p in model.parameters())
    model.forward = lambda x: model.b(model.block(x))  # no checkpoint: the same model trains
    opt.backward(model(torch.randn(1, 8)).sum())
    opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_sample_with_a_non_finite_gradient_does_not_reveal_its_presence():
    """Under nonfinite="raise" (the default) whether the step raises depends on one sample, so an adversary whose
    sample overflows learns from the exception whether it was drawn. nonfinite="drop" gives such a sample clip
    factor 0, its rows masked out of every sum (0 * inf is NaN), and steps as usual: the step exists and moves
    by at most R / expected_batch_size (here by nothing: the sample adds exactly 0)."""
    R = 1.0
    x = torch.randn(3, 3)
    y = torch.randn(3, 2)
    without = _update(x[:2], y[:2], torch.float32, max_grad_norm=R, nonfinite="drop")
    x[2] = float("inf")  # a non-finite loss and gradient for sample 2 only (any overflow to inf in its forward)
    with pytest.raises(FloatingPointError, match="no step was taken"):
        _update(x, y, torch.float32, max_grad_norm=R)
    with_it = _update(x, y, torch.float32, max_grad_norm=R, nonfinite="drop")
    assert torch.isfinite(with_it).all()
    # noise off: the step must exist and move by at most R / expected_batch_size (2.0)
    assert float((with_it - without).norm()) <= R / 2.0 * (1 + 1e-5)
