"""Benchmark of ``linear_norms``: per-sample squared norms of a Linear layer's weight (and bias) gradient.

ghost: <A_i A_i^T, G_i G_i^T>, nominal 2 B T^2 (d + p) + 2 B T^2 FLOPs (two Grams, product, sum);
inst:  ||G_i^T A_i||_F^2,      nominal 2 B T d p + 2 B d p FLOPs;
bias:  ||sum_t g_t||^2,        B T p + 2 B p FLOPs.
Bytes: A and G read once, the (B,) norms written (float32).
Shapes: GPT-2 small at B=32, T=256 (qkv 768->2304, MLP 768->3072 and 3072->768, LM head 768->50257).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench.ops import _common

OP = "linear_norms"


def _case(name: str, B: int, T: int, d: int, p: int, method: str, bias: bool = True) -> dict[str, Any]:
    return dict(name=f"{name} {method}", B=B, T=T, d=d, p=p, method=method, bias=bias)


GPU_CASES = [
    _case(f"{n} B=32 T=256 {d}->{p}", 32, 256, d, p, m, bias=n != "lm_head")
    for n, d, p in [("qkv", 768, 2304), ("fc", 768, 3072), ("proj", 3072, 768), ("lm_head", 768, 50257)]
    for m in ("ghost", "inst")
]
CPU_CASES = [_case("B=8 T=32 64->96", 8, 32, 64, 96, m) for m in ("ghost", "inst")] + [
    _case("B=4 T=1 33->17", 4, 1, 33, 17, m) for m in ("ghost", "inst")
]


def make(case: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(case["B"], case["T"], case["d"], device=device, dtype=dtype, generator=g)
    go = torch.randn(case["B"], case["T"], case["p"], device=device, dtype=dtype, generator=g)
    return (a, go), {"bias": case["bias"], "method": case["method"]}


def flops(case: dict[str, Any]) -> float:
    B, T, d, p = case["B"], case["T"], case["d"], case["p"]
    w = 2 * B * T * T * (d + p) + 2 * B * T * T if case["method"] == "ghost" else 2 * B * T * d * p + 2 * B * d * p
    return float(w + (B * T * p + 2 * B * p if case["bias"] else 0))


def nbytes(case: dict[str, Any], itemsize: int) -> float:
    B, T, d, p = case["B"], case["T"], case["d"], case["p"]
    return float(B * T * (d + p) * itemsize + B * 4 * (2 if case["bias"] else 1))


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c["name"])
def test_linear_norms_reference(benchmark, case):
    _common.pytest_case(sys.modules[__name__], benchmark, case)


if __name__ == "__main__":
    _common.run([sys.modules[__name__]])
