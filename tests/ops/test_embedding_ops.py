"""Reference Embedding ops vs naive per-sample gradients (torch's own embedding backward, one sample at a
time, float64).

Tolerances for float64: every quantity is a sum of at most a few hundred O(1) products, so rounding
is below 1e3 * 2^-53 ~ 1e-13 relative; rtol=1e-9 leaves a wide margin while a wrong formula (a
repeated token counted once, the padding row counted, a missed cross pair) changes results at O(1).
"""

from __future__ import annotations

import math

import _naive as naive
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dpkernels.ops as ops
from dpkernels.ops import reference as ref
from dpkernels.ops.reference import _common

F64 = dict(rtol=1e-9, atol=1e-12)
DT = torch.float64


def make_case(B, T, V, D, seed, repeat=True):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen)
    if repeat and T > 1:
        ids[:, -1] = ids[:, 0]  # at least one repeated token per sample
    g = torch.randn(B, T, D, generator=gen, dtype=DT)
    return ids, g, gen


shapes = dict(
    B=st.integers(0, 4),
    T=st.integers(1, 7),
    V=st.integers(1, 9),
    D=st.integers(1, 5),
    pad=st.one_of(st.none(), st.integers(-9, 8)),
    seed=st.integers(0, 2**31 - 1),
)


def norm_pad(pad, V):
    """A valid padding_idx for a table of V rows (torch accepts -V..V-1), or None."""
    return None if pad is None else (pad % V) - (V if pad < 0 else 0)


@settings(max_examples=60, deadline=None)
@given(**shapes)
@example(B=0, T=3, V=5, D=2, pad=0, seed=0)
@example(B=1, T=1, V=1, D=1, pad=None, seed=1)
@example(B=3, T=7, V=2, D=3, pad=-1, seed=2)
def test_embedding_norms_match_naive(B, T, V, D, pad, seed):
    pad = norm_pad(pad, V)
    ids, g, _ = make_case(B, T, V, D, seed)
    psg = naive.embedding(ids, g, V, pad)
    got = ref.embedding_norms(ids, g, num_embeddings=V, padding_idx=pad)
    assert got.shape == (B,) and got.dtype == DT
    torch.testing.assert_close(got, psg.square().sum(dim=(1, 2)), **F64)


def test_repeated_tokens_are_summed_before_squaring():
    # one sample, the same token twice with gradients u and u: ||2u||^2 = 4||u||^2, not 2||u||^2
    ids = torch.tensor([[3, 3]])
    u = torch.tensor([1.0, -2.0], dtype=DT)
    g = torch.stack([u, u])[None]
    got = ref.embedding_norms(ids, g, num_embeddings=5, padding_idx=None)
    torch.testing.assert_close(got, 4 * u.square().sum()[None], **F64)
    # and the padding row is excluded even when repeated
    got = ref.embedding_norms(ids, g, num_embeddings=5, padding_idx=3)
    torch.testing.assert_close(got, torch.zeros(1, dtype=DT), **F64)


@settings(max_examples=60, deadline=None)
@given(**shapes, scale=st.sampled_from([1.0, 0.25]), with_prev=st.booleans())
@example(B=0, T=2, V=3, D=2, pad=1, seed=0, scale=0.25, with_prev=True)
@example(B=1, T=1, V=1, D=1, pad=None, seed=1, scale=1.0, with_prev=False)
def test_embedding_clipped_sum_matches_naive(B, T, V, D, pad, seed, scale, with_prev):
    pad = norm_pad(pad, V)
    ids, g, gen = make_case(B, T, V, D, seed)
    c = torch.rand(B, generator=gen, dtype=DT)
    prev = torch.randn(V, D, generator=gen, dtype=DT) if with_prev else None
    psg = naive.embedding(ids, g, V, pad)
    want = scale * ((prev if with_prev else 0) + (c[:, None, None] * psg).sum(0))
    got = ref.embedding_clipped_sum(ids, g, c, num_embeddings=V, padding_idx=pad, scale=scale, prev=prev)
    assert got.shape == (V, D) and got.dtype == DT
    torch.testing.assert_close(got, want, **F64)


def test_noise_is_dense_over_the_table():
    """Rows no sample touched, and the padding row, get noise of std noise_std * scale."""
    V, D, B, T, pad = 4000, 4, 3, 5, 2
    sigma, scale, seed = 0.7, 0.25, 123
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (B, T), generator=gen)
    ids[0, 0] = pad
    g = torch.randn(B, T, D, generator=gen, dtype=DT)
    c = torch.rand(B, generator=gen, dtype=DT)
    noisy = ref.embedding_clipped_sum(
        ids, g, c, num_embeddings=V, padding_idx=pad, noise_std=sigma, scale=scale, seed=seed
    )
    clean = ref.embedding_clipped_sum(ids, g, c, num_embeddings=V, padding_idx=pad)
    # the noise is exactly the shared epilogue's: scale * sigma * gaussian((V, D), seed) on every coordinate
    z = _common.gaussian((V, D), seed, "cpu", DT)
    torch.testing.assert_close(noisy, scale * (clean + sigma * z), **F64)
    assert torch.all(clean[pad] == 0) and torch.all(noisy[pad] != 0)
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[ids.flatten()] = False
    vals = noisy[untouched].flatten()
    n = vals.numel()
    # sample std of n ~ 16000 Gaussians: relative standard error 1/sqrt(2n) ~ 0.56%; 4% is > 7 SE
    assert abs(vals.std().item() / (sigma * scale) - 1) < 0.04
    # mean: standard error std/sqrt(n); 5 SE
    assert abs(vals.mean().item()) < 5 * sigma * scale / math.sqrt(n)


def test_other_seeds_give_other_noise():
    ids = torch.zeros(1, 1, dtype=torch.long)
    g = torch.zeros(1, 1, 3, dtype=DT)
    c = torch.ones(1, dtype=DT)
    a = ref.embedding_clipped_sum(ids, g, c, num_embeddings=7, padding_idx=None, noise_std=1.0, seed=1)
    b = ref.embedding_clipped_sum(ids, g, c, num_embeddings=7, padding_idx=None, noise_std=1.0, seed=2)
    assert not torch.allclose(a, b)


cross_shapes = dict(
    B=st.integers(0, 4),
    Te=st.integers(1, 6),
    Th=st.integers(1, 6),
    V=st.integers(1, 9),
    D=st.integers(1, 5),
    pad=st.one_of(st.none(), st.integers(-9, 8)),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=60, deadline=None)
@given(**cross_shapes)
@example(B=0, Te=2, Th=3, V=4, D=2, pad=0, seed=0)
@example(B=1, Te=1, Th=1, V=1, D=1, pad=None, seed=1)
@example(B=2, Te=5, Th=1, V=3, D=3, pad=-3, seed=2)
def test_embedding_linear_cross_matches_naive(B, Te, Th, V, D, pad, seed):
    pad = norm_pad(pad, V)
    ids, g_e, gen = make_case(B, Te, V, D, seed)
    a = torch.randn(B, Th, D, generator=gen, dtype=DT)
    g_h = torch.randn(B, Th, V, generator=gen, dtype=DT)
    dE = naive.embedding(ids, g_e, V, pad)
    dH = torch.einsum("bsv,bsd->bvd", g_h, a)  # the head's per-sample gradient G_i^T A_i
    got = ref.embedding_linear_cross(ids, g_e, a, g_h, padding_idx=pad)
    torch.testing.assert_close(got, (dE * dH).sum(dim=(1, 2)), **F64)
    # the identity the tied norm rests on: ||dE + dH||^2 = ||dE||^2 + ||dH||^2 + 2 <dE, dH>
    nE = ref.embedding_norms(ids, g_e, num_embeddings=V, padding_idx=pad)
    nH, _ = ref.linear_norms(a, g_h, bias=False, method="ghost")
    torch.testing.assert_close(nE + nH + 2 * got, (dE + dH).square().sum(dim=(1, 2)), **F64)


def test_cross_chunked_equals_unchunked(monkeypatch):
    ids, g_e, gen = make_case(5, 4, 6, 3, seed=7)
    a = torch.randn(5, 3, 3, generator=gen, dtype=DT)
    g_h = torch.randn(5, 3, 6, generator=gen, dtype=DT)
    whole = ref.embedding_linear_cross(ids, g_e, a, g_h, padding_idx=1)
    monkeypatch.setattr(_common, "_CHUNK_ELEMS", 1)  # one sample per chunk
    # float64, the same per-sample arithmetic: only the batching differs
    torch.testing.assert_close(ref.embedding_linear_cross(ids, g_e, a, g_h, padding_idx=1), whole, **F64)


def test_nonfinite_gradient_at_padding_positions_is_ignored():
    # torch's weight gradient ignores padding positions whatever their output gradient; so do the ops
    ids = torch.tensor([[0, 2]])
    g = torch.tensor([[[math.inf, 1.0], [1.0, 2.0]]], dtype=DT)
    c = torch.ones(1, dtype=DT)
    assert torch.isfinite(ref.embedding_norms(ids, g, num_embeddings=3, padding_idx=0)).all()
    assert torch.isfinite(ref.embedding_clipped_sum(ids, g, c, num_embeddings=3, padding_idx=0)).all()
    a = torch.ones(1, 1, 2, dtype=DT)
    g_h = torch.ones(1, 1, 3, dtype=DT)
    assert torch.isfinite(ref.embedding_linear_cross(ids, g, a, g_h, padding_idx=0)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype):
    ids, g, gen = make_case(3, 6, 4, 5, seed=3)
    c = torch.rand(3, generator=gen, dtype=DT)
    n = ref.embedding_norms(ids, g.to(dtype), num_embeddings=4, padding_idx=None)
    s = ref.embedding_clipped_sum(ids, g.to(dtype), c.float(), num_embeddings=4, padding_idx=None)
    assert n.dtype == torch.float32 and s.dtype == torch.float32
    # want: the same rounded g in float64, so the only difference is fp32 accumulation over <= 6 tokens
    # of 5 products each (error ~ 30 * 2^-24 ~ 2e-6 relative); rtol=1e-5 fails for a fp16/bf16 accumulator
    gd = g.to(dtype).double()
    torch.testing.assert_close(
        n.double(), ref.embedding_norms(ids, gd, num_embeddings=4, padding_idx=None), rtol=1e-5, atol=0
    )
    want_s = ref.embedding_clipped_sum(ids, gd, c.float().double(), num_embeddings=4, padding_idx=None)
    torch.testing.assert_close(s.double(), want_s, rtol=1e-5, atol=1e-6)


def test_dispatch_serves_the_reference_on_cpu():
    ids, g, _ = make_case(2, 3, 4, 2, seed=0)
    got = ops.embedding_norms(ids, g, num_embeddings=4, padding_idx=None)
    assert ops.last_backend["embedding_norms"] == "reference"
    torch.testing.assert_close(got, ref.embedding_norms(ids, g, num_embeddings=4, padding_idx=None), **F64)
