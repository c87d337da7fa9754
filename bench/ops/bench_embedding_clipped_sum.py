"""Benchmark of ``embedding_clipped_sum``: scale * (prev + sum_i c_i dW_i + noise_std z) over the (V, D) table.

The noise is dense over the whole table, so for GPT-2's wte the 154 MB float32 write dominates.
Nominal 2 B T D (scale and index_add) + 2 V D (noise, scale) FLOPs; bytes: ids and g read, the (V, D)
float32 table written. Memory-bound: judge it by GB/s.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench.ops import _common

OP = "embedding_clipped_sum"
GPU_CASES = [dict(name="wte B=32 T=256 V=50257 D=768", B=32, T=256, V=50257, D=768),
             dict(name="wpe B=32 T=256 V=1024 D=768", B=32, T=256, V=1024, D=768)]  # fmt: skip
CPU_CASES = [dict(name="B=8 T=32 V=97 D=32", B=8, T=32, V=97, D=32), dict(name="B=2 T=1 V=5 D=3", B=2, T=1, V=5, D=3)]


def make(case: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, case["V"], (case["B"], case["T"]), device=device, generator=g)
    go = torch.randn(case["B"], case["T"], case["D"], device=device, dtype=dtype, generator=g)
    c = torch.rand(case["B"], device=device, generator=g)
    return (ids, go, c), dict(num_embeddings=case["V"], padding_idx=None, noise_std=1.0, scale=1 / case["B"], seed=5)


def flops(case: dict[str, Any]) -> float:
    return float(2 * case["B"] * case["T"] * case["D"] + 2 * case["V"] * case["D"])


def nbytes(case: dict[str, Any], itemsize: int) -> float:
    return float(case["B"] * case["T"] * (8 + case["D"] * itemsize) + 4 * case["V"] * case["D"])


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c["name"])
def test_embedding_clipped_sum_reference(benchmark, case):
    _common.pytest_case(sys.modules[__name__], benchmark, case)


if __name__ == "__main__":
    _common.run([sys.modules[__name__]])
