"""Benchmark of ``affine_clipped_sum``: scale * (prev + sum_i c_i sum_t xhat_it g_it + noise_std z), and the bias.

Nominal 5 B T C FLOPs (scale by c_i, product, two sums); bytes: xhat and g read, two (C,) float32 written.
Memory-bound: judge it by GB/s. Shapes as bench_affine_norms.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench.ops import _common

OP = "affine_clipped_sum"
GPU_CASES = [dict(name="LayerNorm B=32 T=256 C=768", B=32, T=256, C=768),
             dict(name="GroupNorm B=32 T=1024 C=64", B=32, T=1024, C=64)]  # fmt: skip
CPU_CASES = [dict(name="B=8 T=32 C=64", B=8, T=32, C=64), dict(name="B=1 T=1 C=7", B=1, T=1, C=7)]


def make(case: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    xhat = torch.randn(case["B"], case["T"], case["C"], device=device, dtype=dtype, generator=g)
    go = torch.randn(case["B"], case["T"], case["C"], device=device, dtype=dtype, generator=g)
    c = torch.rand(case["B"], device=device, generator=g)
    return (xhat, go, c), dict(weight=True, bias=True, noise_std=1.0, scale=1 / case["B"], seed_w=1, seed_b=2)


def flops(case: dict[str, Any]) -> float:
    return float(5 * case["B"] * case["T"] * case["C"])


def nbytes(case: dict[str, Any], itemsize: int) -> float:
    return float(2 * case["B"] * case["T"] * case["C"] * itemsize + 8 * case["C"])


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c["name"])
def test_affine_clipped_sum_reference(benchmark, case):
    _common.pytest_case(sys.modules[__name__], benchmark, case)


if __name__ == "__main__":
    _common.run([sys.modules[__name__]])
