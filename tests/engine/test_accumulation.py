"""Gradient accumulation: k micro-batches with accumulation_steps=k are one logical DP step.

The clipped sums of the micro-batches add up (each micro-batch's mean loss is undone with its own
size), the total is divided once by the expected batch size, and the noise is added once, at the
last micro-batch or at step() for a partial logical step.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import dpkernels

from .zoo import (
    BY_NAME,
    Case,
    batch,
    batch_loss,
    per_sample_grads,
    reference_groups,
    reference_update,
    require,
    trainable,
)

EBS = 5.0
SIZES = (3, 1, 4)  # uneven micro-batches, one of a single sample
# float64; summation orders differ from the oracle's (micro-batch partial sums, ghost norms): a few
# ulps times the number of terms, far below 1e-9 relative, which any missing or doubled micro-batch,
# wrong loss scale or a sum rounded through float32 (1e-7 relative) exceeds.
TOL = dict(rtol=1e-9, atol=1e-12)
ALPHA = 1e-6  # level of each two-sided statistical check; seeds are fixed, so the tests are deterministic


def _make(case: Case, k: int, **kw):
    model = case.build()
    kw = dict(dict(noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=EBS, accumulation_steps=k), **kw)
    return dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), **kw)


def _micro(case: Case, model, opt, x, y, reduction: str, strategy: str) -> None:
    loss = batch_loss(case, model(x), y, reduction)
    if strategy == "two-pass":
        opt.backward(loss)
    else:
        loss.backward()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in trainable(model).items()}


def _splits(x, y, sizes):
    i = 0
    for s in sizes:
        yield x[i : i + s], y[i : i + s]
        i += s


def _logical_step(case, model, opt, x, y, sizes, reduction="mean", strategy="bk"):
    for xm, ym in _splits(x, y, sizes):
        _micro(case, model, opt, xm, ym, reduction, strategy)
    opt.step()
    return _grads(model)


def _expected(case, x, y, groups, R, reduction):
    model = case.build()
    gr = reference_groups(model, groups)
    ps = per_sample_grads(model, case, x, y)
    return reference_update(ps, gr, [R / math.sqrt(len(gr))] * len(gr), "abadi", EBS if reduction == "mean" else 1.0)


def _params():
    for name in ("mlp", "embedding", "tied", "conv2d", "layernorm"):
        for strategy in ("bk", "two-pass"):
            for reduction in ("mean", "sum"):
                fast = name == "mlp" or (strategy, reduction) == ("bk", "mean")
                yield pytest.param(name, strategy, reduction, marks=[] if fast else [pytest.mark.slow])


@pytest.mark.parametrize("name,strategy,reduction", list(_params()))
@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
def test_micro_batches_equal_one_large_batch(name, strategy, reduction, groups):
    case = BY_NAME[name]
    require(case)
    x, y = batch(case, sum(SIZES))
    R = 0.5  # below most per-sample norms of the zoo: clipping is active
    model, opt = _make(case, len(SIZES), max_grad_norm=R, groups=groups, strategy=strategy, loss_reduction=reduction)
    acc = _logical_step(case, model, opt, x, y, SIZES, reduction, strategy)
    model, opt = _make(case, 1, max_grad_norm=R, groups=groups, strategy=strategy, loss_reduction=reduction)
    big = _logical_step(case, model, opt, x, y, (sum(SIZES),), reduction, strategy)
    expected = _expected(case, x, y, groups, R, reduction)
    for n in expected:
        torch.testing.assert_close(acc[n], big[n], **TOL)
        torch.testing.assert_close(acc[n], expected[n], **TOL)


def _noise_std_ok(noise: torch.Tensor, std: float) -> tuple[bool, str]:
    """sum z^2 / std^2 ~ chi2(n) for n iid N(0, std^2) values."""
    n = noise.numel()
    s = float(noise.square().sum()) / std**2
    lo, hi = stats.chi2.ppf(ALPHA / 2, n), stats.chi2.isf(ALPHA / 2, n)
    return (
        lo <= s <= hi,
        f"n={n}: empirical std / expected = {math.sqrt(s / n):.4f}, "
        f"ok in [{math.sqrt(lo / n):.3f}, {math.sqrt(hi / n):.3f}]",
    )


@pytest.mark.parametrize("sizes", [SIZES, SIZES[:2]], ids=["full", "partial"])
@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
def test_noise_is_added_once_per_logical_step(sizes, strategy):
    """k = 3 micro-batches, or a partial logical step of 2 noised at step(): std sigma R / ebs, not sqrt(k) x.

    The mlp has 139 trainable values; 6 logical steps pool 834, which pins the std to about
    [0.85, 1.17]x at ALPHA: noise added per micro-batch (sqrt(2) or sqrt(3) x) fails.
    """
    case = BY_NAME["mlp"]
    x, y = batch(case, sum(sizes))
    sigma, R, steps = 1.3, 0.5, 6
    model, opt = _make(case, len(SIZES), max_grad_norm=R, strategy=strategy)
    clean = [_logical_step(case, model, opt, x, y, sizes, strategy=strategy) for _ in range(steps)]
    model, opt = _make(case, len(SIZES), max_grad_norm=R, strategy=strategy, noise_multiplier=sigma, seed=11)
    noisy = [_logical_step(case, model, opt, x, y, sizes, strategy=strategy) for _ in range(steps)]
    noise = torch.cat([(noisy[t][n] - clean[t][n]).flatten() for t in range(steps) for n in clean[t]])
    ok, msg = _noise_std_ok(noise, sigma * R / EBS)
    assert ok, msg
    # and the noiseless part is the clipped sum of the micro-batches that ran
    expected = _expected(case, x, y, "all-layer", R, "mean")
    for n in expected:
        torch.testing.assert_close(clean[-1][n], expected[n], **TOL)


def test_partial_logical_step_keeps_float64():
    """A partial step is finished at step(): the accumulated float64 sum must not pass through float32."""
    case = BY_NAME["mlp"]
    x, y = batch(case, 4)
    model, opt = _make(case, 3, max_grad_norm=0.5, noise_multiplier=1.0, seed=5)
    g = _logical_step(case, model, opt, x, y, (2, 2))
    for n, t in g.items():
        assert t.dtype == torch.float64, n
    model, opt = _make(case, 3, max_grad_norm=0.5)
    g = _logical_step(case, model, opt, x, y, (2, 2))
    expected = _expected(case, x, y, "all-layer", 0.5, "mean")
    for n in expected:
        torch.testing.assert_close(g[n], expected[n], **TOL)


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
@pytest.mark.parametrize("k", [1, 2])
def test_too_many_backwards_before_step_is_refused(k, strategy):
    case = BY_NAME["mlp"]
    x, y = batch(case, 2)
    model, opt = _make(case, k, strategy=strategy)
    for _ in range(k):
        _micro(case, model, opt, x, y, "mean", strategy)
    with pytest.raises(RuntimeError, match="accumulation_steps"):
        _micro(case, model, opt, x, y, "mean", strategy)
    # the refused pass left nothing behind: step() gives the k micro-batches' update
    g = _grads(model) if k == 1 else None
    opt.step()
    expected = _expected(case, torch.cat([x] * k), torch.cat([y] * k), "all-layer", 1.0, "mean")
    for n, p in trainable(model).items():
        torch.testing.assert_close(p.grad, expected[n], **TOL)
        if g is not None:
            assert torch.equal(p.grad, g[n])


def test_gradients_are_set_per_logical_step_not_accumulated_across_steps():
    case = BY_NAME["mlp"]
    x1, y1 = batch(case, 4, seed=1)
    x2, y2 = batch(case, 4, seed=2)
    model, opt = _make(case, 2, max_grad_norm=0.5)
    _logical_step(case, model, opt, x1, y1, (2, 2))
    g2 = _logical_step(case, model, opt, x2, y2, (1, 3))  # no zero_grad in between
    expected = _expected(case, x2, y2, "all-layer", 0.5, "mean")
    for n in expected:
        torch.testing.assert_close(g2[n], expected[n], **TOL)
