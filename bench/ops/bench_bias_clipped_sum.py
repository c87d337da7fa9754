"""Benchmark of ``bias_clipped_sum``: scale * (prev + sum_i c_i sum_t g_it + noise_std z), a (p,) vector.

Nominal 2 B T p + 2 p FLOPs; G read once. Memory-bound: judge it by GB/s.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench.ops import _common

OP = "bias_clipped_sum"
GPU_CASES = [dict(name="B=32 T=256 p=3072", B=32, T=256, p=3072), dict(name="B=32 T=256 p=768", B=32, T=256, p=768)]
CPU_CASES = [dict(name="B=8 T=32 p=96", B=8, T=32, p=96), dict(name="B=1 T=1 p=17", B=1, T=1, p=17)]


def make(case: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    go = torch.randn(case["B"], case["T"], case["p"], device=device, dtype=dtype, generator=g)
    c = torch.rand(case["B"], device=device, generator=g)
    return (go, c), dict(noise_std=1.0, scale=1.0 / case["B"], seed=3)


def flops(case: dict[str, Any]) -> float:
    return float(2 * case["B"] * case["T"] * case["p"] + 2 * case["p"])


def nbytes(case: dict[str, Any], itemsize: int) -> float:
    return float(case["B"] * case["T"] * case["p"] * itemsize + 4 * case["p"])


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c["name"])
def test_bias_clipped_sum_reference(benchmark, case):
    _common.pytest_case(sys.modules[__name__], benchmark, case)


if __name__ == "__main__":
    _common.run([sys.modules[__name__]])
