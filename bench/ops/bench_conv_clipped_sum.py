"""Benchmark of ``conv_clipped_sum``: scale * (prev + sum_i c_i grad_W(x_i, g_i) + noise_std z), and the bias.

Nominal 2 B T d p FLOPs (the weight-gradient convolution, T = output positions, d = C_in k^2, p = C_out)
+ B T p (scaling by c_i) + 2 B T p (bias). Bytes: x and g read once, the float32 weight and bias written.
Shapes: ResNet-18 on 32x32 inputs at B=32.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench.ops import _common

OP = "conv_clipped_sum"


def _case(name: str, B: int, C: int, H: int, Co: int, k: int, stride: int) -> dict[str, Any]:
    pad = k // 2
    Ho = (H + 2 * pad - k) // stride + 1
    return dict(name=name, B=B, C=C, H=H, Co=Co, k=k, stride=stride, pad=pad, Ho=Ho)


# (name, C_in, H, C_out, kernel, stride): ResNet-18 3x3 convs at 32x32 input, without the ImageNet stem's downsampling
RESNET_LAYERS = [("layer1", 64, 32, 64, 3, 1), ("layer3", 256, 8, 256, 3, 1), ("layer4", 512, 4, 512, 3, 1)]
GPU_CASES = [_case(f"{n} B=32 {C}x{H}x{H} -> {Co} k{k}/{s}", 32, C, H, Co, k, s) for n, C, H, Co, k, s in RESNET_LAYERS]
CPU_CASES = [_case("B=4 8x9x9 -> 12 k3/2", 4, 8, 9, 12, 3, 2), _case("B=1 3x5x5 -> 4 k1/1", 1, 3, 5, 4, 1, 1)]


def make(case: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[tuple, dict[str, Any]]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case["B"], case["C"], case["H"], case["H"], device=device, dtype=dtype, generator=g)
    go = torch.randn(case["B"], case["Co"], case["Ho"], case["Ho"], device=device, dtype=dtype, generator=g)
    c = torch.rand(case["B"], device=device, generator=g)
    kw = dict(weight_shape=(case["Co"], case["C"], case["k"], case["k"]), stride=case["stride"], padding=case["pad"],
              dilation=1, groups=1, bias=True, noise_std=1.0, scale=1.0 / case["B"], seed_w=1, seed_b=2)  # fmt: skip
    return (x, go, c), kw


def flops(case: dict[str, Any]) -> float:
    B, T, d, p = case["B"], case["Ho"] ** 2, case["C"] * case["k"] ** 2, case["Co"]
    return float(2 * B * T * d * p + 3 * B * T * p)


def nbytes(case: dict[str, Any], itemsize: int) -> float:
    B, T, d, p = case["B"], case["Ho"] ** 2, case["C"] * case["k"] ** 2, case["Co"]
    return float((B * case["C"] * case["H"] ** 2 + B * T * p) * itemsize + 4 * p * (d + 1))


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c["name"])
def test_conv_clipped_sum_reference(benchmark, case):
    _common.pytest_case(sys.modules[__name__], benchmark, case)


if __name__ == "__main__":
    _common.run([sys.modules[__name__]])
