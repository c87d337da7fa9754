"""torch's per-backend float32 matmul precision (torch.backends.mkldnn.matmul.fp32_precision = "bf16" and
the like) lets oneDNN / cuBLAS round float32 operands, like the legacy set_float32_matmul_precision; the
legacy getter the bounds read then raises RuntimeError, so every certified norm raised. The bounds now read
either setting and take bf16 operand rounding (u_in = 2^-7) under it."""

from __future__ import annotations

import torch
from torch import nn

from dpkernels import api
from dpkernels.ops.bounds import matmul_input_roundoff


def test_per_backend_bf16_matmul_precision_is_read_and_norms_stay_upper_bounds():
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        assert matmul_input_roundoff(torch.float32) == 2.0**-7
        gen = torch.Generator().manual_seed(5)
        a, g = torch.randn(4, 16, 32, generator=gen), torch.randn(4, 16, 24, generator=gen)
        lin = nn.Linear(32, 24, bias=False)
        cert = api.per_sample_norms(lin, a, g, backend="reference")[lin.weight]
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    exact = torch.einsum("btp,btd->bpd", g.double(), a.double()).square().sum((1, 2))
    assert bool((cert >= exact).all())
    assert torch.get_float32_matmul_precision() == "highest"  # restored: the legacy getter answers again
    assert matmul_input_roundoff(torch.float32) == 0.0
