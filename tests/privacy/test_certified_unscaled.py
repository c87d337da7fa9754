"""The ghost bound's unscaled Grams (dpkernels.ops.reference.bounds._unscaled_ok) stay upper bounds.

On the CPU, float32 rows whose per-sample power-of-two scales lie in [2^-60, 2^20] skip the scaled copy:
the Gram of the stored rows is used as it is (s = 1, the underflow constant in absolute units). These tests check
that the route is taken exactly where claimed, and that the certified norm stays >= the exact float64
norm of the stored tensors (no tolerance) at the edges of that range and just outside it, on natural,
cancelling, subnormal-laden and mixed-magnitude samples, for float32 (unscaled) and bfloat16 (scaled),
with Grams of one chunk and of several (d > 1024: float64 sums of chunk Grams).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from dpkernels import ops
from dpkernels.ops.reference import bounds as rb


def _exact(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.stack([(gi.double().T @ ai.double()).square().sum() for ai, gi in zip(a, g, strict=True)])


def _with_norm(x: torch.Tensor, log2_norm: float) -> torch.Tensor:
    """x (float64, one sample) rescaled so its 2-norm is 2^log2_norm."""
    return x * (2.0**log2_norm / x.norm())


def _batch(kind: str, log2_norm: float, T: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """4 samples (float64) of T rows of n, each of 2-norm ~2^log2_norm, per ``kind``:
    natural; cancel: pairs of rows (x, x + 1e-6 delta); subnormal: natural rows with a third of the entries
    replaced by float32 subnormals (their products underflow); mixed: half the rows ~1e-30 of the rest."""
    x = torch.randn(4, T, n, generator=gen, dtype=torch.float64)
    if kind == "cancel":
        x[:, 1::2] = x[:, 0::2][:, : x[:, 1::2].shape[1]] + 1e-6 * torch.randn(
            4, x[:, 1::2].shape[1], n, generator=gen, dtype=torch.float64
        )
    elif kind == "mixed":
        x[:, ::2] *= 1e-30
    out = torch.stack([_with_norm(xi, log2_norm) for xi in x])
    if kind == "subnormal":
        sub = torch.rand(out.shape, generator=gen, dtype=torch.float64) < 1 / 3
        out = torch.where(sub, torch.randn(out.shape, generator=gen, dtype=torch.float64) * 1e-40, out)
    return out


def _cancel_g(g: torch.Tensor) -> torch.Tensor:
    """Output gradients (w, -w) on the pairs: with rows (a, a + delta) the gradient is -w delta^T."""
    g = g.clone()
    g[:, 1::2] = -g[:, 0::2][:, : g[:, 1::2].shape[1]]
    return g


# scales pow2_scales gives a sample of norm 2^k (k in [e - 1, e)): 2^-e. log2 norms -> s:
# 59.5 -> 2^-60 (the range's lower edge), 60.5 -> 2^-61 (outside), -20.5 -> 2^20 (upper edge),
# -21.5 -> 2^21 (outside), 0.3 -> 2^-1, -9 -> 2^8 (natural output gradients).
_NORMS = [59.5, 60.5, -20.5, -21.5, 0.3, -9.0]


@pytest.mark.parametrize("dims", [(6, 5, 3), (5, 1100, 7)], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("kind", ["natural", "cancel", "subnormal", "mixed"])
@pytest.mark.parametrize("ga", _NORMS, ids=lambda v: f"a2^{v}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ghost_bound_at_the_edges_of_the_unscaled_range(dtype, ga, kind, dims):
    T, d, p = dims
    gen = torch.Generator().manual_seed(zlib.crc32(repr((str(dtype), ga, kind, dims)).encode()))
    a = _batch(kind, ga, T, d, gen)
    for gg in _NORMS:
        g = _batch("subnormal" if kind == "subnormal" else "natural", gg, T, p, gen)
        if kind == "cancel":
            g = _cancel_g(g)
        a32, g32 = a.to(dtype), g.to(dtype)
        exact = _exact(a32, g32)
        cert, _ = ops.certified.linear_norms(a32, g32, bias=False, method="ghost", backend="reference")
        assert bool(torch.isfinite(cert).all()), (ga, gg, cert.tolist())
        bad = (cert < exact).nonzero().flatten().tolist()
        assert not bad, f"a 2^{ga}, g 2^{gg}, {kind}: certified {cert[bad].tolist()} < exact {exact[bad].tolist()}"
        if kind == "natural":
            # natural data keeps the tight bound on either route: gamma_d-sized inflation (the ghost bound's
            # ~1e-4 at these shapes; 1e-3 as in test_certified_norms)
            rel = float((cert / exact - 1).max())
            assert rel <= 1e-3, f"a 2^{ga}, g 2^{gg}: inflated by {rel:.3g}"


def test_unscaled_route_is_taken_exactly_in_range(monkeypatch):
    """The scaled copy is skipped for in-range float32 operands on the CPU, and made for every other one:
    one sample out of range (zero, huge, tiny) sends its whole operand through the scaled copy."""
    calls: list[torch.dtype] = []
    real = rb.scale_rows

    def counting(x, s, dtype=None):
        calls.append(x.dtype)
        return real(x, s, dtype)

    monkeypatch.setattr(rb, "scale_rows", counting)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 6, 5, generator=gen)
    g = torch.randn(3, 6, 4, generator=gen) * 1e-3
    cases = [
        (a, g, 0),
        (a.bfloat16(), g, 1),
        (a, g.bfloat16(), 1),
        (a.double(), g.double(), 2),
    ]
    for bad in (0.0, 1e19, 1e-8):
        a_bad = a.clone()
        a_bad[1] *= bad
        cases.append((a_bad, g, 1))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # operands may be rounded to TF32 / bf16: scaled copies
        calls.clear()
        rb._ghost(a, g)
        assert len(calls) == 2, calls
    finally:
        torch.set_float32_matmul_precision(before)
    for x, y, n_scaled in cases:
        calls.clear()
        rb._ghost(x, y)
        assert len(calls) == n_scaled, (x.dtype, y.dtype, calls)


def test_unscaled_and_scaled_routes_agree_on_natural_data(monkeypatch):
    """The same bound either way: the same value (scaling by a power of two commutes with the roundings
    when nothing is subnormal), err and cap moved only by the underflow constant c, absolute (~1e-19)
    unscaled and relative to each sample's size scaled (~1e-19 / s), against token norms ~0.1-10: far
    below 1e-12 relative per factor, up to four factors per term; held to 1e-9. Both bound the exact norm."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 16, 40, generator=gen)
    g = torch.randn(4, 16, 24, generator=gen) * 1e-2
    fast = rb._ghost(a, g)
    monkeypatch.setattr(rb, "_unscaled_ok", lambda xs, s, dt: [False] * len(xs))
    slow = rb._ghost(a, g)
    assert torch.equal(fast.value, slow.value)
    for f, s_ in zip(fast[1:], slow[1:], strict=True):
        torch.testing.assert_close(f, s_, rtol=1e-9, atol=0.0)
    exact = _exact(a, g)
    assert bool((fast.certified() >= exact).all()) and bool((slow.certified() >= exact).all())
