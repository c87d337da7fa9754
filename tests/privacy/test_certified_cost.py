"""The cheaper certificates' routes stay upper bounds: the ghost bound with one operand's Gram kept in its
stored units and the other's scaled (dpkernels.ops.reference.bounds._ghost), the quadratic forms folded
into one pass (`_ghost_terms`), and a norm layer's weight and bias bounded from one stacked tensor
(`affine_norms_bound`). Every check is certified >= the exact float64 norm of the stored tensors, no
tolerance, on natural, cancelling, huge, tiny and subnormal-laden samples.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from dpkernels.ops.bounds import F64
from dpkernels.ops.reference import bounds as rb


def _gen(key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _exact_linear(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.stack([(gi.double().T @ ai.double()).square().sum() for ai, gi in zip(a, g, strict=True)])


def _rows(kind: str, B: int, T: int, n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(B, T, n, generator=gen, dtype=F64)
    if kind == "cancel":  # pairs of rows (x, x + 1e-6 delta)
        x[:, 1::2] = x[:, 0::2][:, : x[:, 1::2].shape[1]] + 1e-6 * torch.randn_like(x[:, 1::2])
    elif kind == "subnormal":  # a third of the entries float32 subnormals: their products underflow
        sub = torch.rand(x.shape, generator=gen, dtype=F64) < 1 / 3
        x = torch.where(sub, x * 1e-40, x)
    elif kind == "huge":
        x = x * 1e30
    return x


def _cancel_g(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g[:, 1::2] = -g[:, 0::2][:, : g[:, 1::2].shape[1]]
    return g


# one sample of the other operand out of the unscaled range (zero, tiny, huge): that operand is scaled,
# the float32 one stays in its stored units
_OUT = {"zero": 0.0, "tiny": 1e-9, "huge": 1e25}


@pytest.mark.parametrize("dims", [(6, 5, 3), (5, 1100, 7)], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("kind", ["natural", "cancel", "subnormal"])
@pytest.mark.parametrize("out", list(_OUT))
@pytest.mark.parametrize("which", ["a", "g"])
def test_ghost_with_one_operand_kept_and_one_scaled(which, out, kind, dims, monkeypatch):
    T, d, p = dims
    gen = _gen(("mixed-route", which, out, kind, dims))
    a = _rows(kind, 4, T, d, gen)
    g = _rows("subnormal" if kind == "subnormal" else "natural", 4, T, p, gen) * 1e-3
    if kind == "cancel":
        g = _cancel_g(g)
    x = a if which == "a" else g
    x[1] = x[1] * _OUT[out]
    a32, g32 = a.float(), g.float()
    scaled: list[int] = []
    real = rb.scale_rows

    def counting(x, s, dtype=None):
        scaled.append(x.shape[2])
        return real(x, s, dtype)

    monkeypatch.setattr(rb, "scale_rows", counting)
    bound = rb._ghost(a32, g32)
    assert scaled == [d if which == "a" else p], scaled  # the route claimed: only the out-of-range operand
    cert = bound.certified()
    exact = _exact_linear(a32, g32)
    assert bool(torch.isfinite(cert).all()), cert.tolist()
    bad = (cert < exact).nonzero().flatten().tolist()
    assert not bad, f"{which} {out} {kind}: certified {cert[bad].tolist()} < exact {exact[bad].tolist()}"
    if kind == "natural":
        # the natural samples keep the tight bound (gamma_d-sized, ~1e-4 here; 1e-3 as in test_certified_norms)
        nat = [0, 2, 3]
        rel = float((cert[nat] / exact[nat] - 1).max())
        assert rel <= 1e-3, rel
    if out == "zero":
        # only underflow-sized terms remain for the zero sample: its scaled token norms are 2c (c ~ 1e-19)
        # in units of s = 2^100, against natural partners: ~(T |x| 2c 2^-100)^2 ~ 1e-100; 1e-90 leaves margin
        assert float(cert[1]) <= 1e-90, cert.tolist()


@pytest.mark.parametrize("kind", ["natural", "cancel", "subnormal", "huge"])
def test_ghost_terms_fold_the_weights_into_one_pass(kind):
    """`_ghost_terms`' err is w_x^2 Q_x + w_y^2 Q_y + k_p P^2 with Q computed separately in float64 (the
    formula the one pass replaces; equal up to float64 rounding, both bounding the same exact sums),
    and never below the quadratic forms with the unrounded weights."""
    gen = _gen(("terms", kind))
    a = _rows(kind, 3, 7, 9, gen).float()
    g = _rows("natural", 3, 7, 4, gen).float() * 1e-2
    k = rb._ghost_consts(7, 9, 4, torch.float32, 0.0)
    s = rb.pow2_scales((a, g), torch.float32)
    Z = rb._grams(rb.scale_rows(a, s[0]), rb.scale_rows(g, s[1]))
    n = Z.diagonal(dim1=2, dim2=3).sqrt().add_(k[0])
    _, err, cap = rb._ghost_terms(Z, n, k)
    Qx = torch.einsum("bt,bts,bs->b", n[:, 1], Z[:, 0].abs(), n[:, 1])
    Qy = torch.einsum("bt,bts,bs->b", n[:, 0], Z[:, 1].abs(), n[:, 0])
    P = (n[:, 0] * n[:, 1]).sum(-1)
    # sums of <= 2T non-negative float64 terms in two orders (~1e-15 relative each); 1e-13 leaves margin
    torch.testing.assert_close(err, k[1] ** 2 * Qx + k[2] ** 2 * Qy + k[3] * P * P, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(cap, k[4] * P * P, rtol=1e-13, atol=0.0)


@pytest.mark.parametrize("kind", ["natural", "cancel", "subnormal", "huge"])
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (F64,) * 2, (F64, torch.float32), (torch.bfloat16,) * 2])
def test_affine_weight_and_bias_stacked(dtypes, kind):
    """Both asked: one stacked float64 pass (xhat and g of one dtype; mixed dtypes take the separate
    path), certified >= exact for each, and the same bounds (up to the order of the float64 sums) as
    asking for each alone."""
    gen = _gen(("affine", str(dtypes), kind))
    x = _rows(kind, 4, 9, 6, gen)
    g = _rows("cancel" if kind == "cancel" else "natural", 4, 9, 6, gen) * 1e-2
    if kind == "cancel":  # sum_t g_t ~ 0 and sum_t x_t g_t ~ 0: the float64 sums' rounding is what is left
        g = _cancel_g(g)
        x[:, 1::2] = x[:, 0::2][:, : x[:, 1::2].shape[1]]
    x, g = x.to(dtypes[0]), g.to(dtypes[1])
    w, b = rb.affine_norms_bound(x, g, weight=True, bias=True)
    w1, _ = rb.affine_norms_bound(x, g, weight=True, bias=False)
    _, b1 = rb.affine_norms_bound(x, g, weight=False, bias=True)
    ew = (x.double() * g.double()).sum(1).square().sum(1)
    eb = g.double().sum(1).square().sum(1)
    for bound, alone, e, what in ((w, w1, ew, "weight"), (b, b1, eb, "bias")):
        assert bound is not None and alone is not None
        c = bound.certified()
        assert bool(torch.isfinite(c).all()), (what, c.tolist())
        assert bool((c >= e).all()), f"{what} {dtypes} {kind}: {c.tolist()} < {e.tolist()}"
        # the same float64 rows summed in another order: the values differ by less than either err
        assert bool(((bound.value - alone.value).abs() <= alone.err).all()), what
        # the same constants on the same Frobenius norm (~1e-16 apart): 1e-13 leaves margin
        torch.testing.assert_close(bound.cap, alone.cap, rtol=1e-13, atol=0.0)
        torch.testing.assert_close(bound.err, alone.err, rtol=1e-13, atol=0.0)


def test_cross_weights_either_route():
    """(w_x n_g, w_y n_a): the CPU's matmul with an exact zero term and the other devices' flip and scalar
    products give the same float64 values, bit for bit (one rounded product per entry), inf and NaN
    entries staying non-finite."""
    gen = _gen("cross")
    n = torch.rand(3, 2, 5, generator=gen, dtype=F64) * 10.0 ** torch.randint(-30, 30, (3, 2, 5), generator=gen)
    a, b = rb._cross(n, 1.5e-3, 7e-5, matmul=True), rb._cross(n, 1.5e-3, 7e-5, matmul=False)
    assert torch.equal(a, b)
    assert torch.equal(a[:, 0], n[:, 1] * 1.5e-3) and torch.equal(a[:, 1], n[:, 0] * 7e-5)
    n[1, 0, 2] = float("inf")
    for route in (True, False):
        assert not bool(torch.isfinite(rb._cross(n, 1.5e-3, 7e-5, matmul=route)[1, 1, 2]))


def test_covered_bound_certifies_without_a_factor_and_its_sums_round_up():
    """A CoveredBound's certified norm is fmin(value + err, cap) itself (its producer covered the sum's
    rounding); a NaN value falls back to the cap; combining bounds gives a plain Bound, rounded up."""
    from dpkernels.ops.bounds import Bound, CoveredBound

    v = torch.tensor([1.0, float("nan"), 3.0], dtype=F64)
    e = torch.tensor([2.0**-60, 1.0, 0.0], dtype=F64)
    c = torch.tensor([5.0, 7.0, 2.0], dtype=F64)
    cov = CoveredBound(v, e, c)
    assert torch.equal(cov.certified(), torch.fmin(v + e, c))
    plain = Bound(v, e, c).certified()
    assert bool((plain[[0, 2]] > torch.fmin(v + e, c)[[0, 2]]).all())  # rounded up
    stacked = CoveredBound(*(t.view(3, 1).expand(3, 2) for t in (v, e, c)))
    for combined in (cov.plus(cov), stacked.group_sum(2)):
        assert type(combined) is Bound


@pytest.mark.parametrize("kind", ["natural", "cancel", "subnormal", "huge"])
def test_reference_bounds_are_covered(kind):
    """Every reference producer whose certified norm skips the factor returns a CoveredBound whose err
    carries at least u |value| (the sum's rounding), and fl(value + err) >= the exact norm."""
    from dpkernels.ops.bounds import U64, CoveredBound

    gen = _gen(("covered", kind))
    a = _rows(kind, 4, 6, 5, gen).float()
    g = _rows("natural", 4, 6, 3, gen).float() * 1e-2
    if kind == "cancel":
        g = _cancel_g(g)
    ew = _exact_linear(a, g)
    eb = g.double().sum(1).square().sum(1)
    cases = [
        ("ghost", rb._ghost(a, g), ew),
        ("inst", rb._inst(a, g), ew),
        ("one-token", rb._one_token(a[:, :1], g[:, :1]), _exact_linear(a[:, :1], g[:, :1])),
        ("bias", rb.bias_norms_bound(g), eb),
        ("affine bias", rb.affine_norms_bound(g * 3, g, weight=True, bias=True)[1], eb),
    ]
    for name, bound, exact in cases:
        assert isinstance(bound, CoveredBound), name
        assert bool((bound.err >= U64 * bound.value.abs()).all()) or bool((bound.err == 0).all()), name
        assert bool((bound.value + bound.err >= exact).all()), name
