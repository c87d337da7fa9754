"""Privacy accounting on Google's dp-accounting library (RDP and PLD).

One DP-SGD step with Poisson sampling rate q and noise multiplier sigma is the
event PoissonSampled(q, Gaussian(sigma)); T steps compose it T times. Nothing
here is a hand-written bound: dp-accounting computes epsilon and calibrates sigma.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dp_accounting
from dp_accounting import pld, rdp

MECHANISMS = ("rdp", "pld")


def _fresh(mechanism: str) -> dp_accounting.PrivacyAccountant:
    if mechanism == "rdp":
        return rdp.RdpAccountant()
    if mechanism == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"accountant must be one of {MECHANISMS}, got {mechanism!r}")


def _event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, int(steps))


def _check(sample_rate: float, steps: int, delta: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def get_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, mechanism: str = "rdp") -> float:
    """Epsilon spent by ``steps`` Poisson-sampled Gaussian steps at ``delta``."""
    _check(sample_rate, steps, delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    acc = _fresh(mechanism)
    acc.compose(_event(noise_multiplier, sample_rate, steps))
    return float(acc.get_epsilon(delta))


def get_noise_multiplier(
    target_epsilon: float, target_delta: float, sample_rate: float, steps: int, mechanism: str = "rdp"
) -> float:
    """The smallest noise multiplier whose ``steps`` steps spend at most ``target_epsilon`` at ``target_delta``."""
    _check(sample_rate, steps, target_delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    if steps == 0:
        return 0.0
    bracket: dp_accounting.mechanism_calibration.BracketInterval
    if mechanism == "rdp":
        bracket = dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
    else:
        # RDP's answer is an upper end for PLD (PLD's epsilon is the tighter one). A PLD of a very
        # small sigma needs a huge discretised loss distribution (sigma = 1e-3 asks for ~38 GiB),
        # so the lower end is found by stepping down from there, not by starting near zero.
        hi = get_noise_multiplier(target_epsilon, target_delta, sample_rate, steps, "rdp")
        lo = 0.8 * hi
        while lo > 0.05 * hi and get_epsilon(lo, sample_rate, steps, target_delta, mechanism) <= target_epsilon:
            lo *= 0.8
        bracket = dp_accounting.ExplicitBracketInterval(lo, hi)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _fresh(mechanism),
            lambda sigma: _event(sigma, sample_rate, steps),
            target_epsilon,
            target_delta,
            bracket_interval=bracket,
        )
    )


@dataclass
class Accountant:
    """Running account of the steps taken: history of (noise_multiplier, sample_rate, steps)."""

    mechanism: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _fresh(self.mechanism)  # validates the name

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def get_epsilon(self, delta: float) -> float:
        if any(sigma == 0 for sigma, _, n in self.history if n > 0):
            return float("inf")
        acc = _fresh(self.mechanism)
        for sigma, q, n in self.history:
            _check(q, n, delta)
            if n > 0:
                acc.compose(_event(sigma, q, n))
        return float(acc.get_epsilon(delta))
