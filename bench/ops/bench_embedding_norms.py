"""Benchmark of ``embedding_norms``: sum_v ||sum_{t: x_t = v} g_t||^2 per sample (exact for repeated tokens).

Nominal 3 B T D FLOPs (scatter-add of the rows, square, sum); bytes: ids (int64) and g read once.
Memory-bound: judge it by GB/s. Shapes: GPT-2 small's wte (V=50257) and wpe (V=1024) at B=32, T=256.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench.ops import _common

OP = "embedding_norms"
GPU_CASES = [dict(name="wte B=32 T=256 V=50257 D=768", B=32, T=256, V=50257, D=768),
             dict(name="wpe B=32 T=256 V=1024 D=768", B=32, T=256, V=1024, D=768)]  # fmt: skip
CPU_CASES = [dict(name="B=8 T=32 V=97 D=32", B=8, T=32, V=97, D=32), dict(name="B=2 T=1 V=5 D=3", B=2, T=1, V=5, D=3)]


def make(case: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, case["V"], (case["B"], case["T"]), device=device, generator=g)
    go = torch.randn(case["B"], case["T"], case["D"], device=device, dtype=dtype, generator=g)
    return (ids, go), dict(num_embeddings=case["V"], padding_idx=None)


def flops(case: dict[str, Any]) -> float:
    return float(3 * case["B"] * case["T"] * case["D"])


def nbytes(case: dict[str, Any], itemsize: int) -> float:
    return float(case["B"] * case["T"] * (8 + case["D"] * itemsize) + 4 * case["B"])


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c["name"])
def test_embedding_norms_reference(benchmark, case):
    _common.pytest_case(sys.modules[__name__], benchmark, case)


if __name__ == "__main__":
    _common.run([sys.modules[__name__]])
