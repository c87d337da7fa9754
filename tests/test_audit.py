"""One-run auditing (dpkernels.audit): the bounds against direct computation and mechanisms of known privacy,
and audits of training through make_private: a library broken in a test-only way (noise far below what the
accountant assumes, or clipping off) is caught, a correct one is not."""

from __future__ import annotations

import logging
import math

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dpkernels
from dpkernels import audit
from dpkernels.engine import Engine


@pytest.fixture(autouse=True)
def _quiet_accounting():
    logger = logging.getLogger("absl")  # dp-accounting's calibration warns per dropped RDP order
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


# ------------------------------------------------------------------------------------------ the bounds


def _direct_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's bound by brute force at 60 digits: every term of the binomial, and the max over all
    i = 1..m (audit.p_value stops at i = v)."""
    mpmath.mp.dps = 60
    p = mpmath.e**eps / (mpmath.e**eps + 1)
    pmf = [mpmath.binomial(r, j) * p**j * (1 - p) ** (r - j) for j in range(r + 1)]

    def tail(x: int) -> mpmath.mpf:  # P[W >= x]
        return mpmath.fsum(pmf[max(x, 0) :])

    alpha = max((tail(v - i) - tail(v)) / i for i in range(1, m + 1))
    return float(min(tail(v) + 2 * m * delta * alpha, 1))


@pytest.mark.parametrize(
    "m, r, v, eps, delta",
    [(50, 20, 15, 0.7, 1e-3), (200, 60, 50, 1.5, 1e-5), (30, 30, 30, 3.0, 1e-2), (40, 10, 3, 0.0, 0.1)],
)
def test_p_value_matches_direct_tail_computation(m, r, v, eps, delta):
    # Both are the same sum in float64 vs 60 digits: agreement to 1e-9 relative is rounding only.
    assert audit.p_value(m, r, v, eps, delta) == pytest.approx(_direct_p_value(m, r, v, eps, delta), rel=1e-9)
    assert audit.p_value(m, r, v, eps, 0.0) == pytest.approx(_direct_p_value(m, r, v, eps, 0.0), rel=1e-9)


@pytest.mark.parametrize("m, r, v, delta", [(200, 60, 50, 1e-5), (100, 40, 30, 1e-3), (60, 60, 60, 0.0)])
def test_epsilon_bound_is_where_the_direct_tail_crosses_beta(m, r, v, delta):
    beta = 0.05
    eps = audit.epsilon_lower_bound(m, r, v, beta=beta, delta=delta)
    assert eps > 0
    assert _direct_p_value(m, r, v, eps, delta) <= beta  # rejected at the bound...
    assert _direct_p_value(m, r, v, eps + 1e-5, delta) > beta  # ...and the bisection stopped within 1e-5 of the edge


def test_all_correct_gives_the_closed_form_and_a_large_bound():
    # delta = 0, v = r: p-value = p^r, so the bound is logit(beta^(1/r)) exactly.
    beta = 0.05
    for r in (10, 100, 1000, 10000):
        eps = audit.epsilon_lower_bound(r, r, r, beta=beta)
        p = beta ** (1 / r)
        assert eps == pytest.approx(math.log(p / (1 - p)), abs=2e-6)
    assert audit.epsilon_lower_bound(10000, 10000, 10000, beta=beta) > 8  # ~8.1: many guesses, all right


def test_bound_is_monotone_in_correct_guesses_and_zero_at_chance():
    m, r = 1000, 200
    bounds = [audit.epsilon_lower_bound(m, r, v, beta=0.05, delta=1e-5) for v in range(0, r + 1, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] > bounds[len(bounds) // 2 + 5] > 0
    assert audit.epsilon_lower_bound(m, r, r // 2, beta=0.05, delta=1e-5) == 0.0  # half right: chance


def test_random_guessing_gives_no_bound():
    rng = np.random.default_rng(0)
    m = 2000
    res = audit.audit_scores(rng.normal(size=m), rng.random(m) < 0.5, beta=0.05, delta=1e-5)
    # Scores independent of inclusion: a positive bound has probability <= beta, and a large one far less
    # (0.3 needs ~57% precision over the 2000 guesses, a 6-sigma event).
    assert res.epsilon < 0.3 and res.epsilon_gdp < 0.3, (res.epsilon, res.epsilon_gdp)


def test_gdp_conversion_matches_dp_accounting():
    # The Gaussian mechanism with sigma = get_sigma_gaussian(eps, delta) is (1/sigma)-GDP and (eps, delta)-DP.
    import dp_accounting

    for eps, delta in [(0.5, 1e-5), (3.0, 1e-5), (8.0, 1e-6)]:
        sigma = dp_accounting.get_sigma_gaussian(eps, delta)
        # dp-accounting's sigma is found by its own bisection; 1e-4 relative covers both searches.
        assert audit.gdp_epsilon(1 / sigma, delta) == pytest.approx(eps, rel=1e-4)


def test_gdp_p_value_is_below_the_bound_at_each_point_of_the_profile():
    m, r, v, mu = 1000, 400, 300, 0.8
    best = audit.gdp_p_value(m, r, v, mu)
    for eps in (0.0, 0.5, 1.0, 2.0, 4.0):
        assert best <= audit.p_value(m, r, v, eps, audit.gdp_delta(mu, eps)) + 1e-15


@pytest.mark.parametrize("mu", [0.5, 3.0])
def test_gaussian_mechanism_of_known_privacy_is_bounded_below_its_epsilon_and_not_far(mu):
    # Each canary's score is N(mu, 1) if in and N(0, 1) if out: releasing them is exactly mu-GDP, so
    # (eps(mu, delta), delta)-DP. A sound audit stays below both (w.p. >= 1 - beta); with 4000 canaries
    # it is also not vacuous.
    rng = np.random.default_rng(1)
    m, delta = 4000, 1e-5
    inc = rng.random(m) < 0.5
    res = audit.audit_scores(rng.normal(size=m) + mu * inc, inc, beta=0.05, delta=delta)
    eps_true = audit.gdp_epsilon(mu, delta)
    assert res.mu <= mu and res.epsilon <= eps_true and res.epsilon_gdp <= eps_true
    assert res.epsilon_gdp >= 0.25 * eps_true, (res.epsilon_gdp, eps_true)


def test_audit_scores_refuses_bad_input():
    with pytest.raises(ValueError, match="one length"):
        audit.audit_scores(np.zeros(4), np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match="finite"):
        audit.audit_scores(np.array([0.0, np.nan, 1.0, 2.0]), np.array([True, False, True, False]))
    with pytest.raises(ValueError, match="guesses"):
        audit.count_correct(np.zeros(4), np.zeros(4, dtype=bool), 3, 2)


# ------------------------------------------------------------------------------------------ the canaries


def test_gradient_canary_goes_through_the_engines_clipping():
    # noise 0: one canary row and two real rows; the canary layer's gradient is R (clipped from 100 R) at
    # the canary's coordinate over the expected batch size, and the real rows' gradient is unchanged by it.
    torch.manual_seed(0)
    m, R, n = 5, 1.0, 10
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    taps = torch.zeros(3, m)
    taps[2, 3] = 100 * R
    is_g = torch.tensor([False, False, True])

    def grads(rows: slice) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = audit.CanaryModel(nn.Linear(4, 2), m)
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        net, private = dpkernels.make_private(
            net, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=n, loss_reduction="sum"
        )
        logits, tapped = net(x[rows], taps[rows])
        loss = torch.where(is_g[rows], tapped, F.cross_entropy(logits, y[rows], reduction="none")).sum()
        private.backward(loss)
        private.step()
        return {k: p.grad.clone() for k, p in net.named_parameters()}

    both, real = grads(slice(0, 3)), grads(slice(0, 2))
    want = torch.zeros(1, m)
    want[0, 3] = R * 100 / (100 + 1e-6)  # abadi: min(1, R / (n + 1e-6)) with n = 100 R
    torch.testing.assert_close(both["canaries.weight"], want, rtol=1e-6, atol=0)
    for k in ("model.weight", "model.bias"):
        torch.testing.assert_close(both[k], real[k], rtol=0, atol=0)


def _tiny_run(gradient_canaries: int = 2000, epsilon: float = 2.0, gdp: bool = False) -> audit.RunAudit:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 6, generator=g), torch.randint(0, 3, (200,), generator=g)
    cfg = audit.AuditConfig(
        model="tiny",
        epochs=2.0,
        epsilon=epsilon,
        batch_size=200,
        lr=0.1,
        input_canaries=0,
        gradient_canaries=gradient_canaries,
        seed=0,
    )
    torch.manual_seed(0)
    data = (TensorDataset(x, y), x[:0], y[:0])
    return audit.run_audit(cfg, model=nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), data=data, gdp=gdp)


def test_correct_library_stays_below_the_accountants_epsilon():
    run = _tiny_run(gdp=True)
    assert run.claimed_epsilon == pytest.approx(2.0, rel=0.01)
    res = run.gradient
    assert res is not None and res.m == 2000
    assert res.epsilon < run.claimed_epsilon and res.epsilon_gdp < run.claimed_epsilon, (res.epsilon, res.epsilon_gdp)
    # Not vacuous either: the included canaries do score higher (their mean is q T R above the excluded ones').
    assert res.in_scores.mean() > res.out_scores.mean()


def test_noise_below_what_the_accountant_assumes_is_caught(monkeypatch):
    # Test-only bug: every noise draw at 1/100 of sigma R, while the accountant still counts sigma.
    spec = Engine._spec

    def quiet(self, p, fin, prev):
        s = spec(self, p, fin, prev)
        s.noise_std *= 0.01
        return s

    add_noise = dpkernels.ops.add_noise
    monkeypatch.setattr(Engine, "_spec", quiet)
    monkeypatch.setattr(
        dpkernels.ops, "add_noise", lambda *a, noise_std, **k: add_noise(*a, noise_std=noise_std * 0.01, **k)
    )
    run = _tiny_run()
    assert run.gradient is not None
    assert run.gradient.epsilon > run.claimed_epsilon + 2, (run.gradient.epsilon, run.claimed_epsilon)


def test_clipping_turned_off_is_caught(monkeypatch):
    # Test-only bug: clip factors of 1, so a canary moves its coordinate by 100 R per step.
    monkeypatch.setattr(dpkernels.engine, "clip_factors", lambda norms, *a, **k: torch.ones_like(norms))
    run = _tiny_run()
    assert run.gradient is not None
    assert run.gradient.epsilon > run.claimed_epsilon + 2, (run.gradient.epsilon, run.claimed_epsilon)


def test_empty_batches_are_steps_of_noise_only():
    # q = 1/16 over 16 rows: two of the 8 batches are empty (seed 0); each is still a step the accountant counts.
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    cfg = audit.AuditConfig(epochs=0.5, batch_size=1, input_canaries=4, gradient_canaries=6, seed=0, epsilon=5.0)
    run = audit.run_audit(cfg, model=nn.Linear(3, 2), data=(TensorDataset(x, y), x[:0], y[:0]), gdp=False)
    assert run.steps == 8 and run.dataset_size == 16
    assert run.claimed_epsilon == pytest.approx(5.0, rel=1e-3)  # all 8 steps counted, as calibrated


def test_cli_writes_report_and_plot(tmp_path):
    out = tmp_path / "audit"
    argv = ["--quick", "--input-canaries", "40", "--gradient-canaries", "100", "--no-gdp", "--no-progress"]
    assert audit.main([*argv, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Claimed epsilon" in report and "Gradient canaries" in report and "Input-space canaries" in report
    assert "![score distributions](scores.png)" in report
    assert (out / "scores.png").stat().st_size > 1000


@pytest.mark.slow
def test_transformer_audit_stays_below_claim(tmp_path):
    cfg = audit.AuditConfig(model="transformer", lr=0.5, epochs=3.0, input_canaries=200, gradient_canaries=500)
    run = audit.run_audit(cfg)
    assert run.gradient is not None and run.input is not None
    assert run.gradient.epsilon < run.claimed_epsilon and run.input.epsilon < run.claimed_epsilon
