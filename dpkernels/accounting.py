"""Privacy accounting on Google's dp-accounting library (RDP and PLD).

One DP-SGD step with Poisson sampling rate q and noise multiplier sigma is the
event PoissonSampled(q, Gaussian(sigma)); T steps compose it T times. Nothing
here is a hand-written bound: dp-accounting computes epsilon and calibrates sigma.
"""

from __future__ import annotations

from collections.abc import Sequence
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


History = Sequence[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps) of the steps taken


def _spent_events(spent: History) -> list[dp_accounting.DpEvent]:
    return [_event(sigma, q, n) for sigma, q, n in spent if n > 0]


def _epsilon(events: list[dp_accounting.DpEvent], delta: float, mechanism: str) -> float:
    acc = _fresh(mechanism)
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


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
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    mechanism: str = "rdp",
    spent: History = (),
) -> float:
    """The smallest noise multiplier whose ``steps`` steps spend at most ``target_epsilon`` at ``target_delta``.

    ``spent``: steps already taken (an `Accountant`'s history); the ``steps`` new ones come after them,
    and the whole run, spent plus new, spends at most ``target_epsilon``."""
    _check(sample_rate, steps, target_delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    for _, q, n in spent:
        _check(q, n, target_delta)
    before = _spent_events(spent)
    if before:
        zero = any(sigma == 0 for sigma, _, n in spent if n > 0)
        eps = float("inf") if zero else _epsilon(before, target_delta, mechanism)
        if not eps < target_epsilon:
            raise ValueError(
                f"the steps already taken spent epsilon = {eps:.4g} at delta = {target_delta:g}, not less than "
                f"target_epsilon = {target_epsilon:g}: no noise multiplier keeps the run within it"
            )
    if steps == 0:
        return 0.0
    return _calibrate(target_epsilon, target_delta, sample_rate, steps, mechanism, before)


def _calibrate(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    mechanism: str,
    before: list[dp_accounting.DpEvent],
) -> float:
    def run(sigma: float) -> dp_accounting.DpEvent:
        new = _event(sigma, sample_rate, steps)
        return dp_accounting.ComposedDpEvent([*before, new]) if before else new

    bracket: dp_accounting.mechanism_calibration.BracketInterval
    if mechanism == "rdp":
        bracket = dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
    else:
        # RDP's answer is an upper end for PLD (PLD's epsilon is the tighter one). A PLD of a very
        # small sigma needs a huge discretised loss distribution (sigma = 1e-3 asks for ~38 GiB),
        # so the lower end is found by stepping down from there, not by starting near zero.
        hi = _calibrate(target_epsilon, target_delta, sample_rate, steps, "rdp", before)
        lo = 0.8 * hi
        while lo > 0.05 * hi and _epsilon([run(lo)], target_delta, mechanism) <= target_epsilon:
            lo *= 0.8
        bracket = dp_accounting.ExplicitBracketInterval(lo, hi)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _fresh(mechanism),
            run,
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
