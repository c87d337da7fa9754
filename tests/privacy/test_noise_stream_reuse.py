"""No noise stream is drawn twice by one private run, whatever the optimizer state loaded into it.

Two noisy updates with the same noise give away their noiseless difference (g1 - g2 = s1 - s2): a rolled-back
checkpoint (optimizer.load_state_dict of an earlier state, in the same run) must draw fresh noise, in both
noise modes and for adaptive clipping's noisy counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dpkernels
from dpkernels.adaptive import AdaptiveClipping


def _run(secure: bool, adaptive: bool):
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    kw = {"adaptive_clipping": AdaptiveClipping(count_noise_multiplier=4.0)} if adaptive else {}
    m, opt = dpkernels.make_private(
        m, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, secure_mode=secure, **kw
    )
    return m, opt


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("secure", [False, True], ids=["default", "secure"])
def test_rollback_draws_fresh_noise(secure: bool, adaptive: bool) -> None:
    m, opt = _run(secure, adaptive)
    x = torch.randn(4, 4)
    saved = opt.state_dict()

    def step():
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()
        counts = opt.engine.adaptive.released.clone() if adaptive else None
        return m.weight.grad.clone(), counts

    g1, c1 = step()
    opt.load_state_dict(saved)  # back to step 0 in the same run, then the same batch again
    g2, c2 = step()
    # Same batch, so g1 - g2 is the noise difference alone: exactly 0 if the stream was reused. Its std is
    # sqrt(2) sigma R / E = 0.35 per coordinate; 12 coordinates all below 1e-6 has probability ~1e-70.
    assert (g1 - g2).abs().max() > 1e-6, "the rolled-back step drew the same noise again"
    if adaptive:
        assert c1 is not None and c2 is not None
        assert (c1 - c2).abs().max() > 1e-9, "the rolled-back step drew the same count noise again"
    assert opt.state_dict()["dpkernels"]["steps"] == 1  # the step count is the loaded one, moved on by one


def test_resume_in_a_fresh_run_keeps_the_step() -> None:
    """A fresh optimizer loading a saved state goes on from its step (with a fixed seed: the streams after it)."""
    _, opt = _run(False, False)
    opt.engine.steps = opt.engine.stream = 7
    saved = opt.state_dict()
    _, opt2 = _run(False, False)
    opt2.load_state_dict(saved)
    assert opt2.engine.steps == 7 and opt2.engine.stream == 7


def test_a_failed_bound_update_is_still_accounted() -> None:
    """A step whose adaptive bound update fails (lr so large that R_t leaves (0, inf)) has already released its
    noisy gradient and counts: the accountant must count it, and the error must be the documented one."""
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m, opt = dpkernels.make_private(
        m, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.01, seed=1,
        adaptive_clipping=AdaptiveClipping(count_noise_multiplier=3.0, lr=1e4),
    )  # fmt: skip
    x = torch.randn(4, 4)
    failed = 0
    for t in range(4):
        opt.zero_grad()
        m(x).sum().backward()
        try:
            opt.step()
        except FloatingPointError:  # exp(-eta (b - gamma)) with eta = 1e4 under/overflows unless b ~ gamma
            failed += 1
        assert opt.accountant.steps == t + 1  # each release counted, failed update or not
    assert failed > 0  # seed=1: deterministic; |b - gamma| > 0.07 (exp under/overflow) has probability ~0.9 per step
