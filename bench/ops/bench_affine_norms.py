"""Benchmark of ``affine_norms``: ||sum_t xhat_it g_it||^2 (weight) and ||sum_t g_it||^2 (bias) per sample.

Nominal 4 B T C FLOPs; bytes: xhat and g read once. Memory-bound: judge it by GB/s.
Shapes: GPT-2 small's LayerNorm (B=32, T=256, C=768); ResNet-18's first GroupNorm at 32x32 (T = H W).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench.ops import _common

OP = "affine_norms"
GPU_CASES = [dict(name="LayerNorm B=32 T=256 C=768", B=32, T=256, C=768),
             dict(name="GroupNorm B=32 T=1024 C=64", B=32, T=1024, C=64)]  # fmt: skip
CPU_CASES = [dict(name="B=8 T=32 C=64", B=8, T=32, C=64), dict(name="B=1 T=1 C=7", B=1, T=1, C=7)]


def make(case: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    xhat = torch.randn(case["B"], case["T"], case["C"], device=device, dtype=dtype, generator=g)
    go = torch.randn(case["B"], case["T"], case["C"], device=device, dtype=dtype, generator=g)
    return (xhat, go), dict(weight=True, bias=True)


def flops(case: dict[str, Any]) -> float:
    return float(4 * case["B"] * case["T"] * case["C"])


def nbytes(case: dict[str, Any], itemsize: int) -> float:
    return float(2 * case["B"] * case["T"] * case["C"] * itemsize + 8 * case["B"])


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c["name"])
def test_affine_norms_reference(benchmark, case):
    _common.pytest_case(sys.modules[__name__], benchmark, case)


if __name__ == "__main__":
    _common.run([sys.modules[__name__]])
