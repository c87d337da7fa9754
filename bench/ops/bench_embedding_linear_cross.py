"""Benchmark of ``embedding_linear_cross``: <dE_i, dH_i> for a table tied between the embedding and the LM head,

    sum_{t,s} g_h[i, s, x_t] * (a_s . g_e,t)

Nominal 2 B Te Th D + 2 B Te D FLOPs; bytes: a and g_e read, B Th Te gathered elements of g_h (not the
whole (B, Th, V) g_h). Shape: GPT-2 small tied head at B=32, T=256.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench.ops import _common

OP = "embedding_linear_cross"
GPU_CASES = [dict(name="tied wte/lm_head B=32 T=256 V=50257 D=768", B=32, T=256, V=50257, D=768)]
CPU_CASES = [dict(name="B=4 T=16 V=97 D=32", B=4, T=16, V=97, D=32), dict(name="B=1 T=1 V=5 D=3", B=1, T=1, V=5, D=3)]


def make(case: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    B, T, V, D = case["B"], case["T"], case["V"], case["D"]
    ids = torch.randint(0, V, (B, T), device=device, generator=g)
    g_e = torch.randn(B, T, D, device=device, dtype=dtype, generator=g)
    a = torch.randn(B, T, D, device=device, dtype=dtype, generator=g)
    g_h = torch.randn(B, T, V, device=device, dtype=dtype, generator=g)
    return (ids, g_e, a, g_h), dict(padding_idx=None)


def flops(case: dict[str, Any]) -> float:
    B, T, D = case["B"], case["T"], case["D"]
    return float(2 * B * T * T * D + 2 * B * T * D)


def nbytes(case: dict[str, Any], itemsize: int) -> float:
    B, T, D = case["B"], case["T"], case["D"]
    return float((2 * B * T * D + B * T * T) * itemsize + B * T * 8 + 4 * B)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c["name"])
def test_embedding_linear_cross_reference(benchmark, case):
    _common.pytest_case(sys.modules[__name__], benchmark, case)


if __name__ == "__main__":
    _common.run([sys.modules[__name__]])
