"""Poisson batches include each example with probability exactly q, the rate the accountant counts.

``torch.rand(N) < q`` compares float32 uniforms, multiples of 2^-24, so its rate is ceil(q 2^24) / 2^24:
2^-24 for any q below it (5.96x q at q = 1e-8; 65536x at q = 2^-40), 1.0013x q at q = 1e-6. A larger real
rate than the accounted one spends more privacy than the account says. `dpkernels.data.poisson_mask`
compares 53-bit uniform integers against q's binary digits, exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from dpkernels.data import PoissonBatchSampler, poisson_mask
from dpkernels.distributed import DistributedPoissonSampler

TINY_Q = 2.0**-40  # below float32's uniform resolution 2^-24


def _samplers(n: int, q: float, steps: int):
    yield "poisson", PoissonBatchSampler(n, q, steps=steps, generator=torch.Generator().manual_seed(7))
    yield (
        "distributed",
        DistributedPoissonSampler(n, q, rank=0, world_size=1, steps=steps, generator=torch.Generator().manual_seed(7)),
    )


@pytest.mark.parametrize("which", ["poisson", "distributed"])
def test_a_rate_below_float32_resolution_is_not_rounded_up(which):
    # 2^26 draws: at the true rate 2^-40 the expected count is 2^-14 (P(any) < 7e-5); at float32's 2^-24 it
    # is 4 (this seed draws 2 with float32 uniforms). Fixed seed: deterministic.
    sampler = dict(_samplers(2**22, TINY_Q, 16))[which]
    included = sum(len(b) for b in sampler)
    assert included == 0, f"{included} examples included at q = 2^-40 in 2^26 draws: the rate was rounded up"


@pytest.mark.parametrize("q", [0.3, 1e-3, 1.0])
def test_the_rate_is_q(q):
    n = 400_000
    mask = poisson_mask(n, q, torch.Generator().manual_seed(3))
    # binomial count: within 6 standard deviations of n q (level ~2e-9); exact for q = 1
    sd = math.sqrt(n * q * (1 - q))
    assert abs(int(mask.sum()) - n * q) <= 6 * sd


def test_rates_at_the_edges_of_float64():
    g = torch.Generator().manual_seed(0)
    assert poisson_mask(1000, 5e-324, g).sum() == 0  # the smallest subnormal q: 22 digits at most, no loop
    assert poisson_mask(1000, 1.0, g).all() and poisson_mask(0, 0.5, g).numel() == 0
