"""The noise of a step has the scale sigma R_total / expected_batch_size on every parameter kind.

A step whose clipped sum is zero (the loss is 0 * output: every output gradient is 0, so every per-sample
gradient and the clipped sum vanish, while every DP layer's backward, clipped-sum op and fused noise run)
leaves exactly the noise in .grad. Per parameter kind (Linear weight and bias, Conv2d weight, Embedding
table, LayerNorm affine weight and bias, a tapped raw parameter) the values divided by the expected std
must be N(0, 1): a Kolmogorov-Smirnov test accepts them, and rejects the same values read as if the
scale were 0.67x or 1.5x (the test has the power to tell a wrong scale).

Thresholds: each KS test runs at level ALPHA = 1e-6 on N >= 4000 values (fixed seeds: deterministic).
The KS distance between N(0, 1) and N(0, s^2) is max_x |Phi(x) - Phi(x / s)|, 0.12 for s = 1.5 and 0.15
for s = 0.67; the level-1e-6 critical value is sqrt(ln(2 / ALPHA) / (2 N)) = 0.043 at N = 4000, so a
wrong scale is rejected with probability ~1 (its empirical distance is >= 0.12 - 0.043 except with
probability < ALPHA), and the right one is accepted except with probability ALPHA.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

import dpkernels

ALPHA = 1e-6
N_MIN = 4000
SIGMA, R, EBS = 1.3, 0.7, 5.0


class _Tapped(nn.Module):
    """A raw (1, 32, 128) parameter added to the batch (a ViT position table), tapped for per-sample grads."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 32, 128))

    def forward(self, x):
        return x + self.pos


def _models():
    torch.manual_seed(0)
    tapped = dpkernels.tap_parameters(_Tapped(), ["pos"])
    return {
        "linear": (nn.Sequential(nn.Linear(8, 1024)), lambda: torch.randn(3, 2, 8)),
        "conv": (nn.Sequential(nn.Conv2d(8, 16, 5, bias=False)), lambda: torch.randn(3, 8, 7, 7)),
        "embedding": (nn.Sequential(nn.Embedding(512, 8)), lambda: torch.randint(0, 512, (3, 6))),
        "norm": (nn.Sequential(nn.LayerNorm(1024)), lambda: torch.randn(3, 2, 1024)),
        "tap": (nn.Sequential(tapped), lambda: torch.randn(3, 32, 128)),
    }


def _noise(kind: str, secure: bool = False) -> dict[str, torch.Tensor]:
    """{parameter name: noise values / expected std}, over enough steps for N_MIN values per parameter;
    ``secure``: make_private(secure_mode=True) (ChaCha20 keyed from the OS, no seed)."""
    model, data = _models()[kind]
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=SIGMA, max_grad_norm=R,
        expected_batch_size=EBS, seed=None if secure else 1234, secure_mode=secure,
    )  # fmt: skip
    std = SIGMA * R / EBS
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    steps = max(math.ceil(N_MIN / p.numel()) for p in params.values())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for _ in range(steps):
        opt.zero_grad()
        (model(data()) * 0).sum().backward()  # zero output gradients: zero clipped sums, noise only
        opt.step()
        for n, p in params.items():
            out[n].append(p.grad.detach().flatten().double() / std)
    return {n: torch.cat(v) for n, v in out.items()}


@pytest.mark.parametrize("secure", [False, True], ids=["default", "secure"])
@pytest.mark.parametrize("kind", ["linear", "conv", "embedding", "norm", "tap"])
def test_noise_scale_per_parameter_kind(kind, secure):
    for name, z in _noise(kind, secure).items():
        assert z.numel() >= N_MIN
        p_right = stats.kstest(z.numpy(), "norm").pvalue
        assert p_right > ALPHA, f"{kind} {name}: the noise is not N(0, (sigma R / ebs)^2) (KS p = {p_right:.3g})"
        for wrong in (0.67, 1.5):
            p_wrong = stats.kstest((z / wrong).numpy(), "norm").pvalue
            assert p_wrong < ALPHA, f"{kind} {name}: KS cannot tell scale {wrong}x from the right one (p = {p_wrong})"
