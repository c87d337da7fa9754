"""Adaptive (quantile) clipping: each group's bound follows a target quantile of its per-sample norms.

Andrew, Thakkar, McMahan & Ramaswamy, "Differentially Private Learning with Adaptive Clipping"
(NeurIPS 2021). Per step t and clipping group g, with n_ig sample i's certified norm over the group
(the one the engine clips by), R_g its bound and E the expected (logical) batch size:

    count_g = sum_i (1[n_ig <= R_g] - 1/2) + sigma_b z_g,        z ~ N(0, I_G)
    b_g     = count_g / E + 1/2                                  (the private fraction of n_ig <= R_g)
    R_g    <- R_g * exp(-eta (b_g - gamma))                      (geometric update)

so R_g rises while fewer than a fraction gamma (target_quantile) of the samples fit under it, and
falls otherwise: its fixed point is the gamma-quantile of the norms.

Privacy. The step releases two Gaussian queries of one Poisson-sampled batch: the clipped sum
(L2 sensitivity R_total = sqrt(sum_g R_g^2) under adding or removing a sample, noise sigma_grad R_total)
and the count vector (each coordinate moves by exactly 1/2 when a sample is added or removed, the
1/2 subtracted so that its sign does not matter: L2 sensitivity sqrt(G)/2 over the G groups,
noise sigma_b per coordinate). Scaling each query by its noise, the pair is one Gaussian mechanism
of unit noise on a vector of sensitivity sqrt(1/sigma_grad^2 + G/(4 sigma_b^2)), i.e. a Gaussian
mechanism of noise multiplier sigma exactly when

    sigma_grad = (sigma^-2 - G (2 sigma_b)^-2)^(-1/2)

(with G = 1 the paper's Theorem 1). So the user gives the overall ``noise_multiplier`` sigma (or
``target_epsilon``, which calibrates it) and the accountant counts Poisson-sampled Gaussian(sigma)
steps, unchanged; the gradient's noise is raised to sigma_grad. This needs 2 sigma_b > sqrt(G) sigma;
smaller sigma_b is refused. R_t depends only on earlier released counts, so adaptive composition
applies. Replace-one moves each count coordinate by at most 1 (sensitivity sqrt(G)), as the sum by 2 R.

The counts stay on the device through the backward passes (the indicator and its sum are device ops);
the engine reads the G noisy counts once, at ``step()``. With data-parallel ranks each adds
sigma_b / sqrt(W) of noise to its own count and the counts are summed with the gradients. The raw
count is secret (it lives in the engine, which is never saved or copied); the noisy count and the
bounds R_t are differentially private outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import ops

__all__ = ["AdaptiveClipping", "AdaptiveState", "grad_noise_multiplier"]


@dataclass(frozen=True)
class AdaptiveClipping:
    """Settings of adaptive clipping (see the module docstring for the update and the privacy).

    target_quantile: gamma in (0, 1), the fraction of per-sample norms each bound should sit above
        (0.5: the median).
    lr: eta > 0 of the geometric update R <- R exp(-eta (b - gamma)) (the paper uses 0.2).
    count_noise_multiplier: sigma_b >= 0, the std of the noise on each group's count, in samples; it must
        exceed sqrt(G) sigma / 2 (G clipping groups). The paper suggests about expected_batch_size / 20.
    The initial bounds are ``max_grad_norm``.
    """

    count_noise_multiplier: float
    target_quantile: float = 0.5
    lr: float = 0.2

    def __post_init__(self) -> None:
        q, lr, sb = self.target_quantile, self.lr, self.count_noise_multiplier
        if not (isinstance(q, int | float) and 0 < q < 1):
            raise ValueError(f"adaptive_clipping: target_quantile must be in (0, 1) (0.5 is the median), got {q!r}")
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"adaptive_clipping: lr must be a finite number > 0 (the paper uses 0.2), got {lr!r}")
        if not (isinstance(sb, int | float) and math.isfinite(sb) and sb >= 0):
            raise ValueError(f"adaptive_clipping: count_noise_multiplier must be a finite number >= 0, got {sb!r}")

    @classmethod
    def of(cls, spec: Any) -> AdaptiveClipping:
        """``make_private(adaptive_clipping=...)``: an AdaptiveClipping or a dict of its fields."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"target_quantile", "lr", "count_noise_multiplier"})
            if unknown:
                raise ValueError(
                    f"adaptive_clipping: unknown setting(s) {unknown}; the settings are target_quantile, lr and "
                    f"count_noise_multiplier"
                )
            if "count_noise_multiplier" not in spec:
                raise ValueError(
                    "adaptive_clipping needs count_noise_multiplier (sigma_b, the noise std on each group's count of "
                    "unclipped samples; about expected_batch_size / 20 in the paper)"
                )
            return cls(**spec)
        raise TypeError(
            f"adaptive_clipping must be a dpkernels.adaptive.AdaptiveClipping or a dict of its fields, got "
            f"{type(spec).__name__}"
        )


def grad_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float, groups: int) -> float:
    """sigma_grad = (sigma^-2 - G (2 sigma_b)^-2)^(-1/2): the gradient's noise multiplier that, with the count
    vector's noise sigma_b, makes the step a Gaussian mechanism of noise multiplier sigma (0 for sigma = 0)."""
    sigma, sb = float(noise_multiplier), float(count_noise_multiplier)
    if sigma == 0:
        return 0.0
    left = sigma**-2 - groups / (2 * sb) ** 2 if sb > 0 else -math.inf
    if not left > 0:
        need = math.sqrt(groups) * sigma / 2
        raise ValueError(
            f"adaptive_clipping: count_noise_multiplier={sb:g} is too small for noise_multiplier={sigma:.4g} with "
            f"{groups} clipping group(s): the noisy counts alone would spend the whole privacy budget "
            f"(sigma_grad = (sigma^-2 - G (2 sigma_b)^-2)^-1/2 needs sigma_b > sqrt(G) sigma / 2 = {need:.4g}). "
            f"Give a larger count_noise_multiplier (about expected_batch_size / 20 in the paper), or fewer groups"
        )
    return left**-0.5


class AdaptiveState:
    """The engine's adaptive-clipping state: the counts of the step in progress (secret, on the device) and
    the update of the bounds at the step. Lives in the engine only (never saved or copied)."""

    def __init__(self, config: AdaptiveClipping, groups: int):
        self.config = config
        self.groups = groups
        self._pass: list[Tensor | None] = [None] * groups  # this pass's centred counts, until its sums commit
        self._count: Tensor | None = None  # the step's centred counts so far, (G,) float64
        self.released: Tensor | None = None  # the noisy counts of the last step (DP output)

    # ------------------------------------------------------------------ during backward
    def begin_pass(self) -> None:
        self._pass = [None] * self.groups

    def observe(self, gi: int, norm2: Tensor, bound: float) -> None:
        """Group ``gi``'s certified squared norms: sum_i (1[n_i <= R] - 1/2), kept on the device (no read)."""
        inside = (norm2.to(torch.float64) <= bound * bound).to(torch.float64)
        self._pass[gi] = (inside - 0.5).sum()

    def commit(self, device: torch.device) -> None:
        """The pass's clipped sums were committed: its counts join the step's (a pass that failed never does)."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        counts = torch.stack([zero if c is None else c.to(device) for c in self._pass])
        self._count = counts if self._count is None else self._count + counts
        self._pass = [None] * self.groups

    def drop(self) -> None:
        """A failed pass: its counts are forgotten, as its sums are."""
        self._pass = [None] * self.groups

    def clear(self) -> None:
        """The step's micro-batches were lost: so are their counts."""
        self._count = None
        self.drop()

    # ------------------------------------------------------------------ at the step
    def release(self, engine: Any, seed: int) -> Tensor:
        """The step's noisy counts sum_i (1[n_i <= R] - 1/2) + (sigma_b / sqrt(W)) z, this rank's share of the
        noise (sigma_b on one process), on the device; summed over the ranks by the optimizer."""
        prev, self._count = self._count, None
        std = self.config.count_noise_multiplier / math.sqrt(engine.world_size)
        device = engine._params[0].device
        if engine.secure is not None:  # secure mode: the counts' noise from its ChaCha20 stream too
            self.released = engine.secure.noise(
                prev, (self.groups,), noise_std=std, scale=1.0, step=engine.stream, index=len(engine._params),
                rank=engine.rank, device=device, dtype=torch.float64,
            )  # fmt: skip
        else:
            self.released = ops.add_noise(
                prev, (self.groups,), noise_std=std, scale=1.0, seed=seed, device=device, dtype=torch.float64
            )
        return self.released

    def update(self, engine: Any) -> None:
        """R_g <- R_g exp(-eta (b_g - gamma)), b_g = count_g / E + 1/2: the step's one read (of the G noisy counts)."""
        assert self.released is not None
        counts = self.released.tolist()
        eta, gamma = self.config.lr, self.config.target_quantile
        out = []
        for r, c in zip(engine.bounds, counts, strict=True):
            b = c / engine.expected_batch_size + 0.5
            e = -eta * (b - gamma)
            out.append(r * math.exp(e) if e < 700 else math.inf)  # exp overflows past ~709: the bound left (0, inf)
        if not all(math.isfinite(r) and r > 0 for r in out):
            raise FloatingPointError(
                f"adaptive clipping: a bound left (0, inf) ({out}): lower adaptive_clipping lr or raise max_grad_norm"
            )
        set_bounds(engine, out)

    def restore(self, engine: Any, bounds: Any) -> None:
        """The bounds of a saved optimizer state (DPOptimizer.load_state_dict): a resumed run goes on from them."""
        if not (
            isinstance(bounds, list | tuple)
            and len(bounds) == self.groups
            and all(isinstance(b, float | int) and math.isfinite(b) and b > 0 for b in bounds)
        ):
            raise ValueError(
                f"the optimizer state's adaptive clipping bounds must be {self.groups} finite positive numbers (one "
                f"per clipping group, as DPOptimizer.state_dict() writes them), got {bounds!r:.200}"
            )
        set_bounds(engine, [float(b) for b in bounds])


def set_bounds(engine: Any, bounds: list[float]) -> None:
    """The engine's bounds R_g and R_total = sqrt(sum_g R_g^2), which the clip factors and the noise use."""
    engine.bounds = [float(b) for b in bounds]
    engine.r_total = math.sqrt(sum(b * b for b in engine.bounds))


def attach(engine: Any, spec: Any) -> None:
    """Turn on adaptive clipping in ``engine`` (make_private(adaptive_clipping=spec)): per-group counts, and the
    gradient's noise multiplier lowered to sigma_grad so that the step stays a Gaussian(sigma) mechanism."""
    config = AdaptiveClipping.of(spec)
    G = len(engine.groups)
    engine.grad_noise_multiplier = grad_noise_multiplier(engine.noise_multiplier, config.count_noise_multiplier, G)
    engine.adaptive = AdaptiveState(config, G)
