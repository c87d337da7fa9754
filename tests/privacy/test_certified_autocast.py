"""The certified norms hold under the caller's autocast: the engine forms them in the Backward, where a
CPU (or CUDA) autocast region around ``loss.backward()`` is still active, and autocast would run the
bounds' float32 matmuls in 16 bits, outside every constant of the bounds (natural float32 rows under
bfloat16 autocast gave a ghost norm 0.9984x the exact one)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpkernels import api


def _exact(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.einsum("btp,btd->bpd", g.double(), a.double()).square().sum((1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 64, 64), (40, 8, 8)])  # ghost-shaped and instantiation-shaped
def test_linear_norms_under_cpu_autocast_are_upper_bounds(dtype, shape):
    T, d, p = shape
    gen = torch.Generator().manual_seed(T * 1000 + d)
    a = torch.randn(6, T, d, generator=gen)
    g = torch.randn(6, T, p, generator=gen)
    lin = nn.Linear(d, p, bias=False)
    with torch.autocast("cpu", dtype=dtype):
        cert = api.per_sample_norms(lin, a, g, backend="reference")[lin.weight]
    exact = _exact(a, g)
    assert bool((cert >= exact).all()), f"certified/exact {(cert / exact).tolist()}"


def test_conv_norms_under_cpu_autocast_are_upper_bounds():
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    x = torch.randn(4, 8, 10, 10, generator=gen)
    g = torch.randn(4, 16, 10, 10, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cert = api.per_sample_norms(conv, x, g, backend="reference")[conv.weight]
    a = nn.functional.unfold(x.double(), 3, padding=1).transpose(1, 2)
    exact = _exact(a, g.double().flatten(2).transpose(1, 2))
    assert bool((cert >= exact).all()), f"certified/exact {(cert / exact).tolist()}"
