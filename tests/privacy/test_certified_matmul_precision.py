"""torch's per-backend float32 matmul precision (torch.backends.mkldnn.matmul.fp32_precision = "bf16" and
the like) lets oneDNN / cuBLAS round float32 operands, like the legacy set_float32_matmul_precision; the
legacy getter the bounds read then raises RuntimeError, so every certified norm raised. The bounds now read
either setting and take bf16 operand rounding (u_in = 2^-7) under it."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dpkernels import api
from dpkernels.ops.bounds import matmul_input_roundoff


@contextlib.contextmanager
def _fp32_precision(setting, value: str):
    """``setting.fp32_precision = value`` (a torch.backends object) while the block runs, then the old one."""
    before = setting.fp32_precision
    setting.fp32_precision = value
    try:
        yield
    finally:
        setting.fp32_precision = before


def _certified_weight_norms(
    backend: str, seed: int, B: int, T: int, d: int, p: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(certified, exact float64) per-sample squared norms of a bias-free Linear's weight gradient."""
    gen = torch.Generator().manual_seed(seed)
    a, g = torch.randn(B, T, d, generator=gen), torch.randn(B, T, p, generator=gen)
    lin = nn.Linear(d, p, bias=False)
    cert = api.per_sample_norms(lin, a, g, backend=backend)[lin.weight]
    return cert, torch.einsum("btp,btd->bpd", g.double(), a.double()).square().sum((1, 2))


def test_per_backend_bf16_matmul_precision_is_read_and_norms_stay_upper_bounds():
    with _fp32_precision(torch.backends.mkldnn.matmul, "bf16"):
        assert matmul_input_roundoff(torch.float32) == 2.0**-7
        cert, exact = _certified_weight_norms("reference", 5, 4, 16, 32, 24)
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
    with _fp32_precision(torch.backends.cuda.matmul, "tf32"):
        assert dot_precision(torch.float32) == "tf32"
        assert backend_arithmetic(torch.float32)[1] == 2.0**-10
        cert, exact = _certified_weight_norms("triton", 6, 2, 8, 16, 12)
    assert bool((cert >= exact).all())
    assert dot_precision(torch.float32) == "ieee"
