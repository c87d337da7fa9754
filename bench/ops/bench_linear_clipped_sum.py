"""Benchmark of ``linear_clipped_sum``: scale * (prev + sum_i c_i G_i^T A_i + noise_std z), and the bias.

Nominal FLOPs: 2 B T d p (the clipped-sum matmul) + B T p (row scaling by c_i) + 2 B T p (bias) + 2 p (d + 1)
(noise and scale). Bytes: A and G read once, the (p, d) and (p,) float32 results written.
Shapes: GPT-2 small at B=32, T=256.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench.ops import _common

OP = "linear_clipped_sum"


def _case(name: str, B: int, T: int, d: int, p: int, bias: bool = True) -> dict[str, Any]:
    return dict(name=name, B=B, T=T, d=d, p=p, bias=bias)


GPU_CASES = [
    _case(f"{n} B=32 T=256 {d}->{p}", 32, 256, d, p, bias=n != "lm_head")
    for n, d, p in [("qkv", 768, 2304), ("fc", 768, 3072), ("proj", 3072, 768), ("lm_head", 768, 50257)]
]
CPU_CASES = [_case("B=8 T=32 64->96", 8, 32, 64, 96), _case("B=3 T=1 33->17", 3, 1, 33, 17)]


def make(case: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(case["B"], case["T"], case["d"], device=device, dtype=dtype, generator=g)
    go = torch.randn(case["B"], case["T"], case["p"], device=device, dtype=dtype, generator=g)
    c = torch.rand(case["B"], device=device, generator=g)
    kw = dict(bias=case["bias"], noise_std=1.0, scale=1.0 / case["B"], seed_w=1, seed_b=2)
    return (a, go, c), kw


def flops(case: dict[str, Any]) -> float:
    B, T, d, p = case["B"], case["T"], case["d"], case["p"]
    return float(2 * B * T * d * p + B * T * p + (2 * B * T * p if case["bias"] else 0) + 2 * p * (d + 1))


def nbytes(case: dict[str, Any], itemsize: int) -> float:
    B, T, d, p = case["B"], case["T"], case["d"], case["p"]
    return float(B * T * (d + p) * itemsize + 4 * p * (d + (1 if case["bias"] else 0)))


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c["name"])
def test_linear_clipped_sum_reference(benchmark, case):
    _common.pytest_case(sys.modules[__name__], benchmark, case)


if __name__ == "__main__":
    _common.run([sys.modules[__name__]])
