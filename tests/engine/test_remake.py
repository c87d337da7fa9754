"""make_private again on a private model (how the set of trainable parameters changes mid-run) continues
one run: the privacy account keeps every step taken, the step counter goes on, and with a fixed seed the
noise streams go on (they are functions of the seed and the step: restarting either repeats noise, which
subtracting two updates cancels)."""

from __future__ import annotations

import dp_accounting
import pytest
import torch
from dp_accounting import rdp

import dpkernels

from .zoo import BY_NAME, batch, batch_loss, trainable

Q, DELTA, EBS = 0.01, 1e-5, 4.0


def _make(model, **kw):
    kw = dict(dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=EBS, sample_rate=Q, seed=7), **kw)
    opt = kw.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.0)
    return dpkernels.make_private(model, opt, **kw)


def _step(model, opt, k: int, b: int = 4) -> dict[str, torch.Tensor]:
    case = BY_NAME["mlp"]
    x, y = batch(case, b, seed=k)
    opt.zero_grad()
    batch_loss(case, model(x), y, "mean").backward()
    opt.step()
    return {n: p.grad.clone() for n, p in trainable(model).items()}


def _rdp_epsilon(*runs: tuple[float, int]) -> float:
    acc = rdp.RdpAccountant()
    for sigma, n in runs:
        acc.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(sigma)), n
            )
        )
    return float(acc.get_epsilon(DELTA))


def test_make_private_again_continues_the_account_and_the_step_count():
    model = BY_NAME["mlp"].build()
    model, opt = _make(model)
    for k in range(3):
        _step(model, opt, k)
    model[2].requires_grad_(False)  # the trainable set changes: make_private again, with the original optimizer
    model, opt2 = _make(model, noise_multiplier=1.5, optimizer=opt.original_optimizer)
    for k in range(3, 5):
        _step(model, opt2, k)
    assert opt2.accountant.history == [(1.0, Q, 3), (1.5, Q, 2)]
    assert opt2.engine.steps == 5 == opt2.state_dict()["dpkernels"]["steps"]
    eps = opt2.accountant.get_epsilon(DELTA)
    assert eps == pytest.approx(_rdp_epsilon((1.0, 3), (1.5, 2)), rel=1e-12)
    assert eps > _rdp_epsilon((1.5, 2)) * 1.2  # what a fresh account would report
    assert not any("2.weight" in n for n in trainable(model))
    # the first optimizer is retired: stepping it would noise and count outside the run's account
    with pytest.raises(RuntimeError, match="later make_private call.*use the optimizer that call returned"):
        opt.step()


def test_make_private_again_continues_the_noise_streams():
    """The same trainable set through make_private again takes exactly the uninterrupted run's steps, noise
    included; a changed set draws noise that repeats none of the earlier steps'."""
    straight_model, straight_opt = _make(BY_NAME["mlp"].build())
    straight = [_step(straight_model, straight_opt, k) for k in range(5)]
    model, opt = _make(BY_NAME["mlp"].build())
    for k in range(3):
        _step(model, opt, k)
    model, opt = _make(model, optimizer=opt.original_optimizer)  # seed=7 again: accepted, the run continues
    for k in range(3, 5):
        got = _step(model, opt, k)
        for n in got:
            torch.testing.assert_close(got[n], straight[k][n], rtol=0, atol=0)
    # empty batches: each gradient is noise only
    model, opt = _make(BY_NAME["mlp"].build())
    before = [_step(model, opt, k, b=0) for k in range(3)]
    model[0].requires_grad_(False)  # parameters change places in the engine's order
    model, opt = _make(model, optimizer=opt.original_optimizer)
    after = [_step(model, opt, k, b=0) for k in range(3, 6)]
    for z in after:
        for n, a in z.items():
            for y in before:
                for m, b in y.items():
                    k = min(a.numel(), b.numel())
                    u, v = a.flatten()[:k], b.flatten()[:k]
                    # a repeated stream gives corr 1; independent N(0, 1) vectors of length >= 4 exceed 0.999
                    # with probability < 1e-3 (r^2 ~ Beta(1/2, (k-1)/2)), and the seeds are fixed
                    corr = float((u * v).sum() / (u.norm() * v.norm()))
                    assert abs(corr) < 0.999, f"{n} after make_private again repeats the noise of {m}"


@pytest.mark.parametrize("seed", [7, 8], ids=["same-seed", "another-seed"])
def test_make_private_again_with_a_seed_never_repeats_noise(seed):
    """A script that passes a seed to every make_private call: the step counter goes on, so no stream
    repeats (a fresh engine with the same seed would draw step 0's noise again)."""
    model, opt = _make(BY_NAME["mlp"].build())  # seed=7
    first = _step(model, opt, 0, b=0)  # an empty batch: the gradient is noise only
    model, opt = _make(model, optimizer=opt.original_optimizer, seed=seed)
    again = _step(model, opt, 1, b=0)
    assert opt.engine.steps == 2 and opt.accountant.steps == 2
    for n in first:  # independent N(0, 1) vectors of length >= 4: |corr| > 0.999 has probability < 1e-3
        u, v = first[n].flatten(), again[n].flatten()
        assert abs(float((u * v).sum() / (u.norm() * v.norm()))) < 0.999, f"{n}: step 0's noise again"


def test_make_private_again_without_a_sampling_rate_is_refused():
    model, opt = _make(BY_NAME["mlp"].build())
    _step(model, opt, 0)
    with pytest.raises(ValueError, match="privacy account holds 1 step.*give sample_rate"):
        _make(model, optimizer=opt.original_optimizer, sample_rate=None)


def test_make_private_again_mid_step_is_refused():
    model, opt = _make(BY_NAME["mlp"].build(), accumulation_steps=2)
    case = BY_NAME["mlp"]
    x, y = batch(case, 4)
    batch_loss(case, model(x), y, "mean").backward()
    with pytest.raises(RuntimeError, match=r"1 of 2 micro-batches .* call optimizer.step\(\) first"):
        _make(model, optimizer=opt.original_optimizer, accumulation_steps=2)


def test_target_epsilon_on_a_later_call_budgets_the_whole_run():
    """target_epsilon on a later call calibrates sigma for the steps still planned after those taken: the
    whole run spends the target (a fresh calibration for 3 steps alone would overspend it)."""
    model, opt = _make(BY_NAME["mlp"].build())
    for k in range(3):
        _step(model, opt, k)
    model[2].requires_grad_(False)
    kw = dict(optimizer=opt.original_optimizer, noise_multiplier=None, target_delta=DELTA, steps=3)
    model, opt = _make(model, target_epsilon=2.0, **kw)
    for k in range(3, 6):
        _step(model, opt, k)
    eps = opt.accountant.get_epsilon(DELTA)
    assert eps <= 2.0 * (1 + 1e-3)  # dp-accounting's calibration tolerance
    assert eps >= 1.95  # the smallest sigma that fits, not a larger one
    with pytest.warns(UserWarning, match="step 7 is past the 6 steps"):
        _step(model, opt, 6)
    with pytest.raises(ValueError, match="already taken spent epsilon = .* not less than target_epsilon = 1"):
        _make(model, target_epsilon=1.0, **dict(kw, optimizer=opt.original_optimizer))


def test_layer_left_out_by_make_private_again_refuses_to_train_once_unfrozen():
    case = BY_NAME["mlp"]
    model, opt = _make(case.build())
    model[0].requires_grad_(False)
    model, opt = _make(model, optimizer=opt.original_optimizer)
    _step(model, opt, 0)  # frozen, it computes as before
    model[0].requires_grad_(True)
    x, y = batch(case, 4)
    with pytest.raises(RuntimeError, match="DP layer DPLinear was left out when make_private was called again"):
        batch_loss(case, model(x), y, "mean").backward()
