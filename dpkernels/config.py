"""EngineConfig: the settings of one private run, validated once, frozen.

Everything make_private decides about the privacy mechanism that is a plain value (numbers and names,
not the model's modules or parameter objects): the noise multiplier, the clipping bounds per group,
the clip function, the strategy, the loss reduction, accumulation, the expected batch size, the seed,
perturbed clipping's k, secure mode, the fixed loss scale and what a non-finite per-sample gradient
does. An engine reads it and never writes it; what moves during a run (the bounds under adaptive
clipping, the step counter) lives in the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .clipping import CLIP_FUNCTIONS
from .secure import check_seed

STRATEGIES = ("bk", "two-pass")
LOSS_REDUCTIONS = ("mean", "sum")
NONFINITE = ("raise", "drop")  # what a non-finite per-sample gradient does (make_private's ``nonfinite``)


def _positive_finite(name: str, x: float, why: str = "") -> float:
    if not (isinstance(x, int | float) and x > 0 and math.isfinite(x)):  # NaN fails the comparison
        raise ValueError(f"{name} must be a finite positive number{why}, got {x!r}")
    return float(x)


@dataclass(frozen=True)
class EngineConfig:
    """The validated settings of a DP engine (see make_private for each one's meaning).

    ``bounds``: the clipping bound R_g of each clipping group, in the groups' order, as the run starts.
    ``seed``: the noise seed the caller gave (None: the engine draws one from the OS; refused with
    ``secure_mode``). ``loss_scale``: S of make_private(loss_scale=S).
    """

    noise_multiplier: float
    expected_batch_size: float
    bounds: tuple[float, ...]
    clipping: str = "abadi"
    gamma: float = 0.01
    strategy: str = "bk"
    loss_reduction: str = "mean"
    accumulation_steps: int = 1
    seed: int | None = None
    perturb_k: float = 0.0
    secure_mode: bool = False
    loss_scale: float = 1.0
    nonfinite: str = "raise"

    def __post_init__(self) -> None:
        check_seed(self.secure_mode, self.seed)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        if self.nonfinite not in NONFINITE:
            raise ValueError(
                f"nonfinite must be one of {NONFINITE} (what a sample with a non-finite per-sample gradient does: "
                f"'raise' stops the step with FloatingPointError, 'drop' gives it clip factor 0), got "
                f"{self.nonfinite!r}"
            )
        if self.nonfinite == "drop" and self.perturb_k != 0.0:
            raise ValueError(
                "nonfinite='drop' with perturb_k is not supported yet: perturbed clipping sums c_i (g_i + k zeta_i) "
                "with a product, so a dropped sample's inf or NaN would still reach the sum. Use perturb_k=0, or "
                "nonfinite='raise'"
            )
        if self.clipping not in CLIP_FUNCTIONS:
            raise ValueError(f"clipping must be one of {CLIP_FUNCTIONS}, got {self.clipping!r}")
        ebs = self.expected_batch_size
        if not (isinstance(ebs, int | float) and ebs > 0 and math.isfinite(ebs)):
            raise ValueError(f"expected_batch_size must be a finite positive number, got {ebs}")
        sigma = self.noise_multiplier
        if not (isinstance(sigma, int | float) and sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {sigma}")
        steps = self.accumulation_steps
        if steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {steps}")
        bounds = tuple(
            _positive_finite(f"max_grad_norm (the bound of clipping group {g})", b) for g, b in enumerate(self.bounds)
        )
        if not bounds:
            raise ValueError("bounds: at least one clipping group is needed")
        gamma = _positive_finite("gamma", self.gamma, " (automatic clipping divides by n_i + gamma)")
        scale = _positive_finite("loss_scale", self.loss_scale, " (the engine divides by it)")
        k = self.perturb_k
        if not (isinstance(k, int | float) and k >= 0 and math.isfinite(k)):
            raise ValueError(f"perturb_k must be a finite number >= 0 (0: plain clipping), got {k!r}")
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "expected_batch_size", float(ebs))
        object.__setattr__(self, "bounds", bounds)
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "loss_scale", scale)
        object.__setattr__(self, "perturb_k", float(k))
        object.__setattr__(self, "secure_mode", bool(self.secure_mode))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def mean(self) -> bool:
        """Whether the step's gradient is the mean over the expected batch (1 / E) or the sum."""
        return self.loss_reduction == "mean"

    @property
    def r_total(self) -> float:
        """R_total = sqrt(sum_g R_g^2) of the initial bounds: the sensitivity of the whole update."""
        return math.sqrt(sum(b * b for b in self.bounds))
