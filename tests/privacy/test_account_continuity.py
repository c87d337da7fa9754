"""Loading a saved optimizer state never makes the account forget a release this optimizer made.

A rollback (optimizer.load_state_dict of an earlier state of the same run) used to replace the account by
the saved one: after 50 steps and a load of the step-0 state the accountant held 0 steps, while the model
kept the 50 noisy updates (a careless user restoring the learning-rate schedule or momentum only) and the
abandoned steps' releases had been seen in any case. The account now keeps every release of the run; a state
of another run (a resume) is that run's steps followed by those this optimizer took already.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkernels


def _private(steps: int = 0):
    m = nn.Linear(4, 3)
    m, opt = dpkernels.make_private(
        m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
        sample_rate=0.01,
    )  # fmt: skip
    _steps(m, opt, steps)
    return m, opt


def _steps(m, opt, k: int) -> None:
    for _ in range(k):
        opt.zero_grad()
        m(torch.randn(4, 4)).sum().backward()
        opt.step()


def test_a_rollback_keeps_the_abandoned_steps_counted():
    m, opt = _private()
    saved = opt.state_dict()
    _steps(m, opt, 5)
    eps = opt.accountant.get_epsilon(1e-5)
    opt.load_state_dict(saved)  # back to step 0 of the same run
    assert opt.accountant.steps == 5 and opt.accountant.get_epsilon(1e-5) == pytest.approx(eps)
    _steps(m, opt, 2)
    assert opt.accountant.steps == 7
    opt.load_state_dict(saved)  # and again: the two steps since count too
    assert opt.accountant.steps == 7
    assert opt.engine.steps == 0  # the step counter is the loaded one (its noise streams: fresh ones)


def test_a_resume_continues_the_saved_account():
    _, opt = _private(3)
    saved = opt.state_dict()
    m2, fresh = _private()
    fresh.load_state_dict(saved)  # a fresh optimizer of another process
    assert fresh.accountant.steps == 3
    _steps(m2, fresh, 2)
    later = fresh.state_dict()
    fresh.load_state_dict(saved)  # a rollback in the resumed run: it is the saved run's, all 5 stay counted
    assert fresh.accountant.steps == 5
    _, other = _private(4)
    other.load_state_dict(later)  # a state of another run into an optimizer that already stepped: both count
    assert other.accountant.steps == 9


def test_a_malformed_run_name_is_refused():
    _, opt = _private()
    state = opt.state_dict()
    state["dpkernels"]["run"] = 7
    with pytest.raises(ValueError, match="malformed"):
        opt.load_state_dict(state)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_make_private_on_a_copy_warns_that_its_account_starts_at_zero(how, tmp_path):
    """A copy of a private model holds the original's steps in its weights; make_private on it cannot see
    them (nothing of the engine is copied) and starts at 0: it says so, and loading the original optimizer's
    state continues the account."""
    import copy

    m, opt = _private(3)
    if how == "deepcopy":
        c = copy.deepcopy(m)
    else:
        torch.save(m, tmp_path / "m.pt")
        c = torch.load(tmp_path / "m.pt", weights_only=False)
    with pytest.warns(UserWarning, match=r"copy of a private model.*load_state_dict"):
        c, oc = dpkernels.make_private(
            c, torch.optim.SGD(c.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
            expected_batch_size=4, sample_rate=0.01,
        )  # fmt: skip
    oc.load_state_dict(opt.state_dict())
    assert oc.accountant.steps == 3


def test_an_account_that_jumps_past_the_budget_still_warns():
    """target_epsilon's plan: the first step past it warns, also when the account got there by a load (another
    run's state, a rollback's kept steps), not only by stepping onto planned + 1."""
    _, ran = _private(5)
    m = nn.Linear(4, 3)
    m, opt = dpkernels.make_private(
        m, torch.optim.SGD(m.parameters(), lr=0.1), target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1.0,
        expected_batch_size=4, sample_rate=0.01, steps=3,
    )  # fmt: skip
    opt.load_state_dict(ran.state_dict())  # 5 steps of another run: past the 3 planned
    with pytest.warns(UserWarning, match=r"step 6 is past the 3 steps"):
        _steps(m, opt, 1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _steps(m, opt, 1)  # once
