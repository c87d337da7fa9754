"""Every clipped-sum op, on every backend: a sample whose clip factor is 0 adds exactly 0, whatever its rows
hold (inf, NaN; in the activations or the output gradients). A product would not do (0 * inf is NaN): the
engine's nonfinite="drop" gives a sample with a non-finite gradient c_i = 0 and relies on this, as padding
rows (dpkernels.padding) do.

For each op: the result with sample 1 poisoned and c_1 = 0 equals, bit for bit, the result with sample 1's
rows set to 0 (the same inputs otherwise, so the same rounding on a deterministic backend), and, within the
rounding of a sum in another order, the result without sample 1 at all. The compiled backend's Linear and
Conv sums are checked on both paths (ATen, the CPU's; the tiles, CUDA's, split and unsplit).
"""

from __future__ import annotations

import os

import pytest
import torch

from dpkernels import ops

BACKENDS = ["reference", "triton", "cuda"]
BAD = 1  # the poisoned sample


def _backend(name: str) -> str:
    if name not in ops.available_backends():
        if name == "cuda" and os.environ.get("DPKERNELS_REQUIRE_COMPILED"):
            pytest.fail(f"the compiled backend is required but unavailable: {ops._errors.get(name)}")
        pytest.skip(f"backend {name} unavailable here: {ops._errors.get(name)}")
    return name


def _poison(x: torch.Tensor, value: float) -> torch.Tensor:
    """x with one entry of sample BAD set to ``value`` (and one more to -value: inf - inf is NaN as well)."""
    x = x.clone()
    flat = x[BAD].view(-1) if x[BAD].is_contiguous() else None
    assert flat is not None
    flat[0] = value
    flat[-1] = -value
    return x


def _zero_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[BAD] = 0
    return x


def _without(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:BAD], x[BAD + 1 :]])


def _factors(B: int, dtype: torch.dtype) -> torch.Tensor:
    c = torch.rand(B, dtype=dtype) + 0.25
    c[BAD] = 0.0
    return c


def _linear(dtype, d, p):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, d, generator=g, dtype=dtype)
    gr = torch.randn(4, 5, p, generator=g, dtype=dtype)
    return "linear_clipped_sum", {"a": a, "g": gr}, dict(bias=True)


def _bias(dtype):
    g = torch.Generator().manual_seed(1)
    return "bias_clipped_sum", {"g": torch.randn(4, 6, 3, generator=g, dtype=dtype)}, {}


def _conv(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 4, 6, 5, generator=g, dtype=dtype)
    gr = torch.randn(4, 6, 3, 3, generator=g, dtype=dtype)  # k=3, stride 2, padding 1: (6, 5) -> (3, 3)
    kw = dict(weight_shape=(6, 2, 3, 3), stride=2, padding=1, dilation=1, groups=2, bias=True)
    return "conv_clipped_sum", {"x": x, "g": gr}, kw


def _embedding(dtype):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (4, 5), generator=g)
    ids[0, 0] = ids[BAD, 0]  # a row shared with the poisoned sample
    gr = torch.randn(4, 5, 3, generator=g, dtype=dtype)
    return "embedding_clipped_sum", {"ids": ids, "g": gr}, dict(num_embeddings=7, padding_idx=2)


def _affine(dtype):
    g = torch.Generator().manual_seed(4)
    xhat = torch.randn(4, 5, 3, generator=g, dtype=dtype)
    gr = torch.randn(4, 5, 3, generator=g, dtype=dtype)
    return "affine_clipped_sum", {"xhat": xhat, "g": gr}, dict(weight=True, bias=True)


CASES = {
    "linear-d<p": lambda dt: _linear(dt, 3, 7),  # c scales A (the narrower)
    "linear-d>=p": lambda dt: _linear(dt, 7, 3),  # c scales G
    "bias": _bias,
    "conv2d-groups": _conv,
    "embedding": _embedding,
    "affine": _affine,
}


def _run(op: str, tensors: dict, c: torch.Tensor, kw: dict, backend: str, path: int = 0, splits: int = 0):
    """The op's outputs as a tuple of tensors (None dropped); path/splits: the compiled backend's path."""
    if path:
        epi = (0.0, 1.0, 0, 0, None, None, path, splits)
        if op == "linear_clipped_sum":
            out = torch.ops.dpkernels.cuda_linear_clipped_sum(tensors["a"], tensors["g"], c, kw["bias"], *epi)
        else:
            geo = [[v] * 2 if isinstance(v, int) else list(v) for v in (kw["stride"], kw["padding"], kw["dilation"])]
            out = torch.ops.dpkernels.cuda_conv_clipped_sum(
                tensors["x"], tensors["g"], c, list(kw["weight_shape"]), *geo, kw["groups"], kw["bias"], *epi
            )
    else:
        out = getattr(ops, op)(*tensors.values(), c, **kw, backend=backend)
        assert ops.last_backend[op] == backend
    return tuple(t for t in (out if isinstance(out, tuple) else (out,)) if t is not None)


def _paths(op: str, backend: str) -> list[tuple[int, int]]:
    if backend == "cuda" and op in ("linear_clipped_sum", "conv_clipped_sum"):
        return [(0, 0), (1, 0), (1, 3)]  # ATen; tiles unsplit and split in 3
    return [(0, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_sample_with_clip_factor_zero_adds_exactly_zero(case, value, dtype, backend):
    _backend(backend)
    op, tensors, kw = CASES[case](dtype)
    B = next(iter(tensors.values())).shape[0]
    c = _factors(B, dtype)
    floats = [k for k, t in tensors.items() if t.is_floating_point()]
    for path, splits in _paths(op, backend):
        zeros = {k: _zero_rows(t) if k in floats else t for k, t in tensors.items()}
        zeroed = _run(op, zeros, c, kw, backend, path, splits)
        absent = _run(op, {k: _without(t) for k, t in tensors.items()}, _without(c), kw, backend, path, splits)
        for name in floats:  # poison one operand at a time: A (or xhat) may be inf with G finite
            poisoned = {k: _poison(t, value) if k == name else t for k, t in tensors.items()}
            got = _run(op, poisoned, c, kw, backend, path, splits)
            for out, zero, gone in zip(got, zeroed, absent, strict=True):
                assert torch.isfinite(out).all(), f"{case} ({name} poisoned, path {path}): {out}"
                assert torch.equal(out, zero), f"{case} ({name} poisoned, path {path}) differs from zero rows"
                # without the sample: the same non-zero terms summed in another blocking; each result is within
                # n u sum|terms| of the exact sum (n <= 40 terms here, u = 2^-24 or 2^-53), terms of size ~1-10
                tol = 1e-4 if dtype == torch.float32 else 1e-12
                torch.testing.assert_close(out, gone, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", ["linear-d<p", "linear-d>=p"])
def test_the_reference_linear_sum_in_blocks(case, monkeypatch):
    """The reference Linear sum masks (copies) its unscaled operand a block of rows at a time past _MASK_ELEMS:
    here one row per block, the same result as one block (float64: rounding of another summation order only,
    ~1e-15), the poisoned sample still adding exactly 0."""
    from dpkernels.ops.reference import linear

    op, tensors, kw = CASES[case](torch.float64)
    c = _factors(4, torch.float64)
    whole = _run(op, tensors, c, kw, "reference")
    monkeypatch.setattr(linear, "_MASK_ELEMS", 1)
    poisoned = {k: _poison(t, float("nan")) for k, t in tensors.items()}
    for got in (_run(op, tensors, c, kw, "reference"), _run(op, poisoned, c, kw, "reference")):
        for out, want in zip(got, whole, strict=True):
            torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
