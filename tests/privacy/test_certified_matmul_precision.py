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


def test_triton_reads_the_per_backend_setting_too():
    """The Triton kernels' dot precision and the arithmetic their bounds assume follow the same setting (a
    per-backend "tf32" made both raise, the legacy getter's error)."""
    import pytest

    from dpkernels.ops.bounds import backend_arithmetic

    try:
        from dpkernels.ops.triton._common import dot_precision
    except Exception as exc:  # triton not installed here
        pytest.skip(f"no Triton backend: {exc}")
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        assert dot_precision(torch.float32) == "tf32"
        assert backend_arithmetic(torch.float32)[1] == 2.0**-10
        gen = torch.Generator().manual_seed(6)
        a, g = torch.randn(2, 8, 16, generator=gen), torch.randn(2, 8, 12, generator=gen)
        lin = nn.Linear(16, 12, bias=False)
        cert = api.per_sample_norms(lin, a, g, backend="triton")[lin.weight]
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    exact = torch.einsum("btp,btd->bpd", g.double(), a.double()).square().sum((1, 2))
    assert bool((cert >= exact).all())
    assert dot_precision(torch.float32) == "ieee"
