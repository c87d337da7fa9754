"""Benchmark of ``add_noise``: scale * (prev + noise_std z) for a parameter no sample touched.

No FLOPs worth counting (reported as 2 per element: multiply-add); bytes: prev read (when given) and the
float32 result written. Memory-bound: judge it by GB/s. Shape: GPT-2's (50257, 768) embedding table.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench.ops import _common

OP = "add_noise"
GPU_CASES = [dict(name="wte 50257x768 prev", shape=(50257, 768), prev=True),
             dict(name="wte 50257x768 zeros", shape=(50257, 768), prev=False)]  # fmt: skip
CPU_CASES = [dict(name="97x32 prev", shape=(97, 32), prev=True), dict(name="17 zeros", shape=(17,), prev=False)]


def make(case: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[tuple, dict[str, Any]]:
    prev = torch.randn(case["shape"], device=device, dtype=torch.float32) if case["prev"] else None
    return (prev, case["shape"]), dict(noise_std=1.0, scale=0.5, seed=4, device=device)


def _numel(case: dict[str, Any]) -> int:
    n = 1
    for s in case["shape"]:
        n *= s
    return n


def flops(case: dict[str, Any]) -> float:
    return float(2 * _numel(case))


def nbytes(case: dict[str, Any], itemsize: int) -> float:
    return float(4 * _numel(case) * (2 if case["prev"] else 1))  # float32 whatever the compute dtype


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c["name"])
def test_add_noise_reference(benchmark, case):
    _common.pytest_case(sys.modules[__name__], benchmark, case)


if __name__ == "__main__":
    _common.run([sys.modules[__name__]])
