"""dpkernels.accounting against dp-accounting used directly, calibration, the running Accountant,
and make_private(target_epsilon=...) reaching its target after the planned steps."""

from __future__ import annotations

import dp_accounting
import pytest
import torch
from dp_accounting import pld, rdp
from torch import nn

import dpkernels
from dpkernels.accounting import Accountant, get_epsilon, get_noise_multiplier

DELTA = 1e-5


def _direct(mechanism: str, parts: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Epsilon of Poisson-sampled Gaussian steps composed with dp-accounting's own API."""
    acc = rdp.RdpAccountant() if mechanism == "rdp" else pld.PLDAccountant()
    for sigma, q, n in parts:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    return acc.get_epsilon(delta)


def _eps_cases():
    for mechanism in ("rdp", "pld"):
        for i, (sigma, q, steps) in enumerate([(1.1, 0.05, 100), (0.8, 0.01, 300), (2.0, 1.0, 7)]):
            slow = mechanism == "pld" and i < 2  # a PLD of many subsampled steps takes seconds
            yield pytest.param(mechanism, sigma, q, steps, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("mechanism,sigma,q,steps", list(_eps_cases()))
def test_get_epsilon_matches_dp_accounting(mechanism, sigma, q, steps):
    # the same computation through another path (SelfComposed event vs compose(count)): equal up to
    # float rounding of the composed PLD / RDP curve (1e-9 relative is far below any modelling change,
    # e.g. sampling without replacement or a miscounted step changes epsilon by > 1e-3)
    assert get_epsilon(sigma, q, steps, DELTA, mechanism) == pytest.approx(
        _direct(mechanism, [(sigma, q, steps)]), rel=1e-9
    )


def test_epsilon_is_monotone_and_has_the_right_limits():
    e = [get_epsilon(s, 0.05, 100, DELTA) for s in (0.8, 1.0, 1.5)]
    assert e[0] > e[1] > e[2] > 0  # more noise, less epsilon
    assert get_epsilon(1.0, 0.05, 50, DELTA) < e[1] < get_epsilon(1.0, 0.05, 200, DELTA)  # more steps, more
    assert get_epsilon(0.0, 0.05, 1, DELTA) == float("inf")
    assert get_epsilon(0.0, 0.05, 0, DELTA) == 0.0
    # PLD is tight where RDP is an upper bound
    assert get_epsilon(2.0, 1.0, 7, DELTA, "pld") < get_epsilon(2.0, 1.0, 7, DELTA, "rdp")


def test_epsilon_of_zero_steps_is_zero():
    assert get_epsilon(1.0, 0.05, 0, DELTA) == 0.0


def test_calibration_hits_the_target_from_below_rdp():
    target, q, steps = 2.0, 0.05, 100
    sigma = get_noise_multiplier(target, DELTA, q, steps, "rdp")
    eps = get_epsilon(sigma, q, steps, DELTA, "rdp")
    # calibrate_dp_mechanism bisects sigma to 1e-6 and returns a sigma that does not exceed the target:
    # epsilon is <= target and within 1e-4 relative of it (d eps / d sigma ~ eps / sigma here)
    assert target * (1 - 1e-4) <= eps <= target
    # and it is (about) the smallest such sigma: 0.1% less noise overshoots
    assert get_epsilon(sigma * (1 - 1e-3), q, steps, DELTA, "rdp") > target


def test_calibration_hits_the_target_from_below_pld():
    target, q, steps = 2.0, 0.05, 100
    sigma = get_noise_multiplier(target, DELTA, q, steps, "pld")
    eps = get_epsilon(sigma, q, steps, DELTA, "pld")
    assert target * (1 - 1e-4) <= eps <= target  # as for RDP
    assert get_epsilon(sigma * (1 - 1e-3), q, steps, DELTA, "pld") > target


def test_accountant_history_and_epsilon():
    acc = Accountant("rdp")
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=0.05)
    acc.step(noise_multiplier=1.0, sample_rate=0.05, steps=7)
    acc.step(noise_multiplier=2.0, sample_rate=0.05, steps=5)
    acc.step(noise_multiplier=1.0, sample_rate=0.05)
    assert acc.history == [(1.0, 0.05, 10), (2.0, 0.05, 5), (1.0, 0.05, 1)]  # runs of one setting merged
    assert acc.steps == 16
    # rel 1e-9: same composition, other order of events (RDP composition is a sum over orders)
    assert acc.get_epsilon(DELTA) == pytest.approx(_direct("rdp", acc.history), rel=1e-9)
    assert Accountant().get_epsilon(DELTA) == 0.0
    acc.step(noise_multiplier=0.0, sample_rate=0.05)
    assert acc.get_epsilon(DELTA) == float("inf")
    with pytest.raises(ValueError, match="accountant must be one of"):
        Accountant("gdp")


def _calibrated(**planned):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    return dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_epsilon=3.0, target_delta=DELTA,
        expected_batch_size=10.0, dataset_size=200, max_grad_norm=1.0, **planned,
    )  # fmt: skip


def test_make_private_with_target_epsilon_reaches_it_after_the_planned_steps():
    target, ebs = 3.0, 10.0
    model, opt = _calibrated(steps=40)
    assert opt.sample_rate == pytest.approx(ebs / 200)
    x = torch.randn(int(ebs), 4)
    for t in range(40):
        opt.zero_grad()
        model(x).square().sum(1).mean().backward()
        opt.step()
        if t == 19:
            # half-way, half of the budget is not yet spent (epsilon grows sub-linearly but stays below target)
            assert opt.accountant.get_epsilon(DELTA) < target
    assert opt.accountant.steps == 40
    eps = opt.accountant.get_epsilon(DELTA)
    assert target * (1 - 1e-4) <= eps <= target  # calibrated to 1e-6 in sigma, from below (as above)
    opt.zero_grad()
    model(x).square().sum(1).mean().backward()
    with pytest.warns(UserWarning, match="step 41 is past the 40 steps.*exceeds target_epsilon=3"):
        opt.step()  # the step is taken (and counted), with a warning
    assert opt.accountant.steps == 41 and opt.accountant.get_epsilon(DELTA) > target


def test_make_private_plans_steps_from_epochs():
    # 2 epochs at q = 10 / 200 are 40 steps: the same calibration as steps=40 (both are deterministic)
    assert _calibrated(epochs=2.0)[1].engine.noise_multiplier == _calibrated(steps=40)[1].engine.noise_multiplier
