"""NoisePlan: every noise draw of a private run, keyed and sized in one place.

A parameter's gradient at the end of a logical step is

    scale * (sum_i c_i g_i + rank_std * z),    scale = 1 / E (mean loss) or 1 (sum),
    rank_std = sigma_g R_total / sqrt(world),

z ~ N(0, I) drawn from the stream of (seed, step, parameter index, rank) (`param_seed`; in secure
mode the ChaCha20 stream of (step, index, rank) under an OS-drawn key). ``step`` is the plan's
``stream`` counter: it moves with the optimizer's steps and never back (a rolled-back step must not
draw a used stream again, or the two updates' difference would cancel the noise), so no
(step, parameter, rank) triple ever reuses noise. The ranks' shares sum to N(0, sigma_g^2 R_total^2)
per coordinate (dpkernels.distributed). sigma_g is the accounted noise multiplier, raised under
adaptive clipping (dpkernels.adaptive) to leave room for the noisy counts, which take index
len(params), past the last parameter's.
"""

from __future__ import annotations

import math
import secrets

from torch import Tensor

from . import ops
from .config import EngineConfig
from .secure import SecureNoise


def mix64(*xs: int) -> int:
    """splitmix64 over the inputs: independent 63-bit seeds per (seed, step, parameter)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class NoisePlan:
    """The seed, the step stream, the rank and the noise's size (see the module docstring). Never saved
    or copied with the engine that holds it."""

    def __init__(self, config: EngineConfig):
        self.seed = secrets.randbits(63) if config.seed is None else int(config.seed)
        self.secure = SecureNoise() if config.secure_mode else None  # secure mode: noise added after the sums
        self.stream = 0  # the step index keying the streams: moves with steps, never back
        self.world_size = 1  # data-parallel ranks summing their noised shares (set by dpkernels.distributed)
        self.rank = 0
        self.noise_multiplier = config.noise_multiplier  # sigma_g: the gradient's (adaptive clipping raises it)
        self.r_total = config.r_total  # moves with the bounds under adaptive clipping
        self.scale = 1.0 / config.expected_batch_size if config.mean else 1.0

    def rank_std(self) -> float:
        """sigma_g R_total / sqrt(world): each rank's share of the noise, whose sum over ranks is
        N(0, sigma_g^2 R_total^2) (dpkernels.distributed); sigma_g R_total on one process."""
        return self.noise_multiplier * self.r_total / math.sqrt(self.world_size)

    def std(self) -> float:
        """Standard deviation of the noise on each coordinate of the final gradient: sigma_g R_total scale."""
        return self.noise_multiplier * self.r_total * self.scale

    def seed_of(self, index: int) -> int:
        """The seed of parameter number ``index``'s noise this step (index len(params): the noisy counts)."""
        if self.world_size == 1:
            return mix64(self.seed, self.stream, index)
        return mix64(self.seed, self.stream, index, self.rank)  # one stream per rank, even for one seed

    def fused(self, last: bool) -> tuple[float, float]:
        """(noise_std, scale) of a clipped sum's epilogue: the noise and 1/E in the last micro-batch's sum
        (secure mode adds both after the sum, `noised`), nothing in an earlier one."""
        if not last or self.secure is not None:
            return 0.0, 1.0
        return self.rank_std(), self.scale

    def count_seed(self, n_params: int) -> int:
        """The seed of adaptive clipping's noisy counts: keyed like a parameter's noise, index past the last."""
        return mix64(self.seed, self.stream, n_params, self.rank)

    def noised(self, prev: Tensor | None, index: int, p: Tensor) -> Tensor:
        """scale * (prev + rank_std * z) for parameter ``p``, number ``index``: the end of its step when its
        sum was not noised in place (secure mode; a parameter no sample reached; accumulation's sums).
        In p's dtype in secure mode; else in prev's (a float64 sum is never rounded to float32 here)."""
        if self.secure is not None:
            return self.secure.noise(
                prev,
                p.shape,
                noise_std=self.rank_std(),
                scale=self.scale,
                step=self.stream,
                index=index,
                rank=self.rank,
                device=p.device,
                dtype=p.dtype,
            )
        return ops.add_noise(
            prev,
            p.shape,
            noise_std=self.rank_std(),
            scale=self.scale,
            seed=self.seed_of(index),
            device=p.device,
            dtype=prev.dtype if prev is not None else ops.acc_dtype(p),
        )

    def next_step(self) -> None:
        self.stream += 1
