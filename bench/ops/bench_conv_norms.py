"""Benchmark of ``conv_norms``: per-sample squared norms of a Conv2d's weight (and bias) gradient.

The Linear formulas on A = unfold(x): T = output positions, d = C_in k^2 / groups, p = C_out / groups.
ghost: nominal 2 B T^2 (d + p) + 2 B T^2 FLOPs; inst: 2 B T d p + 2 B d p; bias adds B T p.
Bytes: x and g read once (the unfold is counted as the kernel's own business), (B,) norms written.
Shapes: ResNet-18 on 32x32 CIFAR-style inputs (stem at full resolution) at B=32.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench.ops import _common

OP = "conv_norms"


def _case(name: str, B: int, C: int, H: int, Co: int, k: int, stride: int, method: str) -> dict[str, Any]:
    pad = k // 2
    Ho = (H + 2 * pad - k) // stride + 1
    return dict(name=f"{name} {method}", B=B, C=C, H=H, Co=Co, k=k, stride=stride, pad=pad, Ho=Ho, method=method)


# (name, C_in, H, C_out, kernel, stride): ResNet-18 3x3 convs at 32x32 input, without the ImageNet stem's downsampling
RESNET_LAYERS = [("layer1", 64, 32, 64, 3, 1), ("layer3", 256, 8, 256, 3, 1), ("layer4", 512, 4, 512, 3, 1)]
GPU_CASES = [
    _case(f"{n} B=32 {C}x{H}x{H} -> {Co} k{k}/{s}", 32, C, H, Co, k, s, m)
    for n, C, H, Co, k, s in RESNET_LAYERS
    for m in ("ghost", "inst")
]
CPU_CASES = [_case("B=4 8x9x9 -> 12 k3/2", 4, 8, 9, 12, 3, 2, m) for m in ("ghost", "inst")]


def make(case: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case["B"], case["C"], case["H"], case["H"], device=device, dtype=dtype, generator=g)
    go = torch.randn(case["B"], case["Co"], case["Ho"], case["Ho"], device=device, dtype=dtype, generator=g)
    geom = dict(kernel_size=case["k"], stride=case["stride"], padding=case["pad"], dilation=1, groups=1)
    return (x, go), dict(**geom, bias=True, method=case["method"])


def _tdp(case: dict[str, Any]) -> tuple[int, int, int, int]:
    return case["B"], case["Ho"] ** 2, case["C"] * case["k"] ** 2, case["Co"]


def flops(case: dict[str, Any]) -> float:
    B, T, d, p = _tdp(case)
    w = 2 * B * T * T * (d + p) + 2 * B * T * T if case["method"] == "ghost" else 2 * B * T * d * p + 2 * B * d * p
    return float(w + B * T * p)


def nbytes(case: dict[str, Any], itemsize: int) -> float:
    B, T, _, p = _tdp(case)
    return float((B * case["C"] * case["H"] ** 2 + B * T * p) * itemsize + 8 * B)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c["name"])
def test_conv_norms_reference(benchmark, case):
    _common.pytest_case(sys.modules[__name__], benchmark, case)


if __name__ == "__main__":
    _common.run([sys.modules[__name__]])
