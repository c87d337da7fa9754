"""Empirical sensitivity of a whole DP step with adversarial samples, in float32 and under bf16 autocast.

With the noise off, one sample moves the update by at most R_total / expected_batch_size:

    remove-one:   ||U(D) - U(D \\ {j})|| * ebs <= R_total (1 + 1e-5)
    replace-one:  ||U(D) - U(D with j replaced)|| * ebs <= 2 R_total (1 + 1e-5)

for every layer type of tests/engine/zoo.py (as float32 models) and the modes (book-keeping / two-pass,
all-layer / layer-wise groups, abadi / automatic clipping), where sample j is adversarial: huge inputs
(1e18: float32 Grams overflow; for token inputs, huge targets), or cancelling tokens (two nearly equal
inputs whose output gradients are w and -w: the float32 ghost norm comes out far too small or negative).
tests/engine/test_invariants.py checks the same bound in float64 on natural data; this is its
adversarial, low-precision counterpart.

Tolerance 1e-5: the update of D and of D' are float32 sums of B clipped gradients, each of norm <= R_g,
so each is off by <= ~B * 2^-24 R_total in norm (and the other samples' stored tensors are the same in
both runs), far below 1e-5 R_total; a norm under-stated by the raw float32 ghost norm moves the update by
up to 1000x R here.
"""

from __future__ import annotations

import math

import pytest
import torch

import dpkernels
from tests.engine.zoo import BY_NAME, Case, batch, batch_loss, flat, require, trainable

MODES = [  # (groups, clipping, strategy): each value of each axis appears in the first two
    ("all-layer", "abadi", "bk"),
    ("layer-wise", "automatic", "two-pass"),
    ("layer-wise", "abadi", "bk"),
    ("all-layer", "automatic", "two-pass"),
]
SEQ = ("mlp", "layernorm", "rmsnorm")  # (B, T, d) inputs and (B, T, OUT) targets: tokens can cancel
KINDS = {
    "mlp": ("huge", "huge_grad", "tiny", "cancel"),
    "layernorm": ("huge", "huge_grad", "tiny", "cancel"),
    "rmsnorm": ("huge", "huge_grad", "tiny", "cancel"),
    "conv1d": ("huge", "huge_grad", "tiny"),
    "conv2d": ("huge", "huge_grad", "tiny"),
    "conv3d": ("huge", "huge_grad", "tiny"),
    "groupnorm": ("huge", "huge_grad", "tiny"),
    "embedding": ("huge",),
    "tied": ("natural",),
}
B, EBS = 4, 3.0


def _adversarial(case: Case, model, x, y, kind: str, j: int):
    """x, y with sample j made adversarial (float32)."""
    x, y = x.clone(), y.clone()
    if kind == "huge":  # huge inputs (for token inputs: huge targets)
        if x.is_floating_point():
            x[j] *= 1e18
        else:
            y[j] *= 1e18
    elif kind == "huge_grad":  # huge output gradients: float32 Grams of G overflow
        y[j] *= 1e18
    elif kind == "tiny":  # tiny inputs with huge output gradients: A A^T underflows, G G^T overflows
        x[j] *= 1e-30
        y[j] *= 1e29
    elif kind == "cancel":
        assert case.name in SEQ
        # token 1 = token 0 + 1e-4 noise; targets such that d loss / d out is 1e4 r on token 0 and -1e4 r on
        # token 1: every layer sees tokens (a, a + delta) with output gradients (w, -w), |w| ~ 1e4, whose
        # float32 ghost norm errs by ~|a|^2 |w|^2 u ~ 1e2 against an exact norm ~|w|^2 |delta|^2 ~ 1
        x[j, 1] = x[j, 0] + 1e-4 * torch.randn_like(x[j, 0])
        with torch.no_grad():
            out = model(x[j : j + 1])[0]
        r = torch.randn_like(out[0])
        y[j, 0] = out[0] - 0.5e4 * r
        y[j, 1] = out[1] + 0.5e4 * r
    return x, y


def _update(
    case: Case, model, opt, x, y, strategy: str, autocast: bool, reduction: str, per_sample: bool = False
) -> torch.Tensor:
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    loss = case.loss(out.float(), y) if per_sample else batch_loss(case, out.float(), y, reduction)
    if strategy == "two-pass" or per_sample:
        opt.backward(loss)
    else:
        loss.backward()
    opt.step()
    return flat({n: p.grad.detach().double().clone() for n, p in trainable(model).items()})


def _params():
    for name, kinds in KINDS.items():
        for kind in kinds:
            for autocast in (False, True):
                for i, mode in enumerate(MODES):
                    slow = i >= 2 or (autocast and name not in ("mlp", "conv2d", "tied"))
                    yield pytest.param(
                        name, kind, autocast, *mode, marks=[pytest.mark.slow] if slow else [],
                        id=f"{name}-{kind}-{'bf16' if autocast else 'fp32'}-{'-'.join(mode)}",
                    )  # fmt: skip


@pytest.mark.parametrize("name,kind,autocast,groups,clipping,strategy", list(_params()))
def test_one_adversarial_sample_moves_the_update_by_at_most_r_total(name, kind, autocast, groups, clipping, strategy):
    # bf16 with a scalar mean loss is refused: see test_bf16_mean_loss_through_loss_backward_is_refused
    _check_sensitivity(name, kind, autocast, groups, clipping, strategy, "sum" if autocast else "mean")


def test_bf16_mean_loss_through_loss_backward_is_refused():
    """With loss.mean() under bf16 autocast the stored output gradients would be bf16(dl_i/dout / B): the other
    samples' per-sample gradients would depend on B, which removing a sample changes (the engine multiplies by
    B afterwards, too late to undo the rounding; the step moved by 1.0017 R_total here, more with a larger B).
    Refused before any per-sample work (tests/engine/test_amp.py::test_16bit_mean_loss_is_refused: every layer
    type and route); the fixes are the next two tests."""
    with pytest.raises(RuntimeError, match=r"mean loss through 16 bits.*optimizer\.backward\(losses\)"):
        _check_sensitivity("mlp", "huge", True, "all-layer", "abadi", "bk", "mean")


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
def test_bf16_mean_loss_given_per_sample_is_within_r(strategy):
    """The fix for the refusal above: the (B,) per-sample losses handed to optimizer.backward(losses). The
    engine backpropagates sum_i l_i (no 1/B), so each stored bf16 output gradient is sample i's alone."""
    _check_sensitivity("mlp", "huge", True, "all-layer", "abadi", strategy, "mean", per_sample=True)


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
def test_bf16_sum_loss_is_within_r(strategy):
    """The other fix: loss_reduction="sum" with a summed loss stores bf16(dl_i/dout), again sample i's alone."""
    _check_sensitivity("mlp", "huge", True, "all-layer", "abadi", strategy, "sum")


def _check_sensitivity(name, kind, autocast, groups, clipping, strategy, reduction, per_sample=False):
    case = BY_NAME[name]
    require(case)
    model = case.build().float()
    x, y = batch(case, B, seed=5)
    x = x.float() if x.is_floating_point() else x
    y = y.float() if y.is_floating_point() else y
    j = 1
    x, y = _adversarial(case, model, x, y, kind, j)
    # clipping active for every sample (natural per-sample norms here are O(0.1 .. 10))
    R = 1e-2
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=R,
        expected_batch_size=EBS, loss_reduction=reduction, groups=groups, clipping=clipping, strategy=strategy,
    )  # fmt: skip
    r_total = opt.engine.r_total
    assert r_total == pytest.approx(R, rel=1e-12)
    full = _update(case, model, opt, x, y, strategy, autocast, reduction, per_sample)
    ebs = EBS if reduction == "mean" else 1.0  # a sum's update is not divided by the expected batch size
    keep = [i for i in range(B) if i != j]
    d = float((full - _update(case, model, opt, x[keep], y[keep], strategy, autocast, reduction, per_sample)).norm())
    d *= ebs
    assert math.isfinite(d) and d <= r_total * (1 + 1e-5), f"remove-one: {d / r_total:.6g} R_total"
    # replace it by a second adversarial sample (built from another clean sample)
    x2, y2 = batch(case, B, seed=6)
    x2 = x2.float() if x2.is_floating_point() else x2
    y2 = y2.float() if y2.is_floating_point() else y2
    x2, y2 = _adversarial(case, model, x2, y2, kind, j)
    xr, yr = x.clone(), y.clone()
    xr[j], yr[j] = x2[j], y2[j]
    d = float((full - _update(case, model, opt, xr, yr, strategy, autocast, reduction, per_sample)).norm()) * ebs
    assert math.isfinite(d) and d <= 2 * r_total * (1 + 1e-5), f"replace-one: {d / r_total:.6g} R_total"


# ----------------------------------------------------------------------------- padded rows (static shapes)

PAD = 3  # rows appended to a batch of B real samples, as poisson_loader(..., pad_to=B + PAD) does


def _padded(case: Case, model, x, y, fill: str):
    """x, y with PAD rows appended: zeros (what poisson_loader pads with) or adversarial rows (huge, tiny with
    huge targets, or copies of sample 0 with huge targets), and the mask (False on padding)."""
    xp, yp = torch.cat([x, torch.zeros_like(x[:PAD])]), torch.cat([y, torch.zeros_like(y[:PAD])])
    if fill != "zeros":
        xa, ya = batch(case, PAD, seed=9)
        xa = xa.float() if xa.is_floating_point() else xa
        ya = ya.float() if ya.is_floating_point() else ya
        for j in range(PAD):
            xa, ya = _adversarial(case, model, xa, ya, fill, j)
        xp[B:], yp[B:] = xa, ya
    mask = torch.arange(B + PAD) < B
    return xp, yp, mask


def _masked_update(case: Case, model, opt, x, y, mask, strategy: str) -> torch.Tensor:
    opt.zero_grad()
    opt.backward(batch_loss(case, model(x), y, "mean"), sample_mask=mask)
    opt.step()
    return flat({n: p.grad.detach().double().clone() for n, p in trainable(model).items()})


@pytest.mark.parametrize("groups,clipping,strategy", MODES[:2], ids=["-".join(m) for m in MODES[:2]])
@pytest.mark.parametrize("name", ["mlp", "conv2d", "embedding", "layernorm", "groupnorm", "tied"])
def test_padded_rows_add_nothing_to_the_update(name, groups, clipping, strategy):
    """A batch padded with masked rows gives the update of the batch alone, whatever the padding holds (zeros,
    or adversarial rows: huge inputs / targets), and masking out a real row is removing it (<= R_total).
    Tolerance 1e-5 R_total: both updates are float32 sums of the same B clipped gradients (the padded rows
    add exact zeros, c = 0 times finite values), differing only in summation order (see the module doc)."""
    case = BY_NAME[name]
    require(case)
    model = case.build().float()
    x, y = batch(case, B, seed=5)
    x = x.float() if x.is_floating_point() else x
    y = y.float() if y.is_floating_point() else y
    R = 1e-2
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=R,
        expected_batch_size=EBS, groups=groups, clipping=clipping, strategy=strategy,
    )  # fmt: skip
    tol = opt.engine.r_total * 1e-5 / EBS
    alone = _masked_update(case, model, opt, x, y, torch.ones(B, dtype=torch.bool), strategy)
    assert float(alone.norm()) > 100 * tol  # the update is not trivially zero
    fills = ["zeros", *(k for k in KINDS[name] if k != "cancel")]
    for fill in fills:
        xp, yp, mask = _padded(case, model, x, y, fill)
        d = float((_masked_update(case, model, opt, xp, yp, mask, strategy) - alone).norm())
        assert d <= tol, f"padding with {fill} rows moved the update by {d * EBS / opt.engine.r_total:.3g} R_total"
    xp, yp, mask = _padded(case, model, x, y, "zeros")
    mask[1] = False  # sample 1 masked out: removed from the step
    d = float((_masked_update(case, model, opt, xp, yp, mask, strategy) - alone).norm()) * EBS
    assert 0 < d <= opt.engine.r_total * (1 + 1e-5)


def test_sample_mask_of_the_wrong_shape_is_refused():
    case = BY_NAME["mlp"]
    model = case.build().float()
    x, y = batch(case, B, seed=5)
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, expected_batch_size=EBS
    )
    with pytest.raises(ValueError, match=r"sample_mask must be a bool tensor of shape \(4,\)"):
        opt.backward(batch_loss(case, model(x.float()), y.float(), "mean"), sample_mask=torch.ones(B + 1).bool())
    x = x.float()
    opt.zero_grad()
    opt.backward(batch_loss(case, model(x), y.float(), "mean"), sample_mask=torch.ones(B, dtype=torch.bool))
