"""The compiled backend (csrc/) against the reference on the CPU: every op in float64 (tight) and in
bfloat16 (by SQNR), the checks of its arguments, opcheck, torch.compile through the ops, and its
selection by the dispatcher. On the CPU these run the same functors (kernels.h) the CUDA build runs
as kernels, and the same host code."""

from __future__ import annotations

import math

import pytest
import torch
from _compiled import compiled_backend

import dpkernels
from dpkernels.ops import reference as ref

cu = compiled_backend()
F64 = torch.float64
# float64 results of sums of at most a few hundred O(1) terms in another order: they differ by at most
# K * u * sum|terms| ~ 500 * 1.1e-16 * 500 < 3e-11 absolute, so 1e-10 is tight and never flaky.
TIGHT = dict(rtol=1e-10, atol=1e-10)
# bfloat16 inputs, fp32 accumulation: products of bf16 values are exact in fp32, so the error is the
# fp32 summation's, at most K * u32 relative (u32 = 6e-8) for K <= 2000 terms per sum here: 1.2e-4 ->
# 78 dB. 60 dB leaves room for the cancellation of signed sums and fails any wrong term or scale.
SQNR_DB = 60.0


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=F64):
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).to(dtype)


def _c(B, seed=99, dtype=F64):
    return torch.rand(B, generator=_gen(seed), dtype=F64).to(dtype) + 0.1


def _sqnr(out, want):
    out, want = out.double(), want.double()
    return 10 * math.log10(want.square().sum().item() / max((out - want).square().sum().item(), 1e-300))


def _close(out, want, **tol):
    if want is None:
        assert out is None
        return
    assert out.dtype == want.dtype and out.shape == want.shape
    torch.testing.assert_close(out, want, **(tol or TIGHT))


# ----------------------------------------------------------------------------- Linear and bias


@pytest.mark.parametrize("method", ["ghost", "inst"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_norms_f64(method, bias):
    a, g = _randn(3, 5, 7, seed=1), _randn(3, 5, 4, seed=2)
    for got, want in zip(
        cu.linear_norms(a, g, bias=bias, method=method), ref.linear_norms(a, g, bias=bias, method=method)
    ):
        _close(got, want)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_clipped_sum_f64(bias):
    a, g, c = _randn(4, 6, 5, seed=3), _randn(4, 6, 3, seed=4), _c(4)
    kw = dict(bias=bias, noise_std=0.0, scale=0.25, prev_w=_randn(3, 5, seed=5), prev_b=_randn(3, seed=6))
    for got, want in zip(cu.linear_clipped_sum(a, g, c, **kw), ref.linear_clipped_sum(a, g, c, **kw)):
        _close(got, want)


# The Linear clipped sum's two paths (op arguments path=1 tiles, 2 aten; splits forces split-K): the
# tile functor (kernels.h ClippedGemm) is the device code of the CUDA kernel, run here phase by phase.
TILES, ATEN = 1, 2


def _clipped_sum_path(a, g, c, path, splits=0, bias=True, noise_std=0.0, scale=1.0, seed_w=0, prev_w=None):
    w, b = torch.ops.dpkernels.cuda_linear_clipped_sum(
        a, g, c, bias, noise_std, scale, seed_w, 1, prev_w, None, path, splits
    )
    return w, (b if bias else None)


def _layout(x, kind):
    if kind == "transposed":  # a (T, B, d) batch seen as (B, T, d): every stride reversed
        return x.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    if kind == "strided":
        return torch.cat([x, x], dim=-1)[..., ::2]
    if kind == "expanded":  # stride 0 over T
        return x[:, :1].expand(x.shape)
    return x


@pytest.mark.parametrize(
    "B, T, p, d",
    [(3, 7, 5, 9), (2, 40, 65, 130), (5, 3, 64, 1), (1, 1, 1, 70), (9, 17, 33, 64)],
)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "expanded"])
@pytest.mark.parametrize("splits", [0, 1, 3, 1000])
def test_linear_clipped_sum_tiles_f64(B, T, p, d, layout, splits):
    """Tiles across the (p, d) output's edges (64 x 64 tiles), rows across the 16-row load steps, any
    number of splits (1000: capped at one per load step), every layout: equal to the reference."""
    a, g = _layout(_randn(B, T, d, seed=60), layout), _layout(_randn(B, T, p, seed=61), layout)
    c = _c(B)
    kw = dict(bias=False, noise_std=0.0, scale=1 / 3, prev_w=_randn(p, d, seed=62))
    want = ref.linear_clipped_sum(a, g, c, **kw)
    _close(_clipped_sum_path(a, g, c, TILES, splits, **kw)[0], want[0])
    _close(_clipped_sum_path(a, g, c, ATEN, **kw)[0], want[0])


@pytest.mark.parametrize("path", [TILES, ATEN])
def test_linear_clipped_sum_empty(path):
    """B = 0 (the noise-only step of an empty Poisson batch) and T = 0: scale * prev; p = 0, d = 0: empty."""
    for B, T, p, d in [(0, 4, 3, 5), (2, 0, 3, 5), (2, 4, 0, 5), (2, 4, 3, 0)]:
        a, g, c = _randn(B, T, d, seed=63), _randn(B, T, p, seed=64), _c(B)
        prev = _randn(p, d, seed=65)
        w, b = _clipped_sum_path(a, g, c, path, scale=0.5, prev_w=prev)
        _close(w, 0.5 * prev)  # (the reference cannot reshape an empty p or d)
        _close(b, ref.bias_clipped_sum(g, c, scale=0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 4])
def test_linear_clipped_sum_tiles_half(dtype, splits):
    """16-bit inputs, fp32 accumulation, by SQNR against the reference in float64 on the same rounded
    values (SQNR_DB: products c_i g a of 16-bit values in fp32 round once, the sums are fp32's). The clip
    factors span 1e-8..1e3 so that c_i g_it leaves fp16's range both ways (past 65504, below 6e-8):
    the tiles multiply in fp32, where it never is fp16, so nothing overflows or flushes."""
    B, T, p, d = 6, 11, 70, 40
    a = _randn(B, T, d, seed=66, dtype=dtype)
    g = (_randn(B, T, p, seed=67) * 1e3).to(dtype)
    c = torch.tensor([1e-8, 1e-6, 1e-3, 1.0, 50.0, 1e3], dtype=torch.float32)
    w, b = _clipped_sum_path(a, g, c, TILES, splits)
    wr, br = ref.linear_clipped_sum(a.double(), g.double(), c.double(), bias=True)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    assert _sqnr(w, wr) > SQNR_DB and _sqnr(b, br) > SQNR_DB
    # every sample counts, the tiny ones too: drop the largest and compare again
    w5, _ = _clipped_sum_path(a[:5], g[:5], c[:5], TILES, splits)
    assert _sqnr(w5, ref.linear_clipped_sum(a[:5].double(), g[:5].double(), c[:5].double(), bias=False)[0]) > SQNR_DB


def test_linear_clipped_sum_tiles_noise():
    """The tiles' epilogue (unsplit and split) draws add_noise's z for seed_w, element by element."""
    a, g, c = _randn(3, 20, 70, seed=68), _randn(3, 20, 66, seed=69), _c(3)
    z = cu.add_noise(None, (66, 70), noise_std=1.0, scale=1.0, seed=77, device="cpu", dtype=F64)
    for splits in (1, 2):
        w1, _ = _clipped_sum_path(a, g, c, TILES, splits, noise_std=0.7, scale=0.5, seed_w=77)
        w0, _ = _clipped_sum_path(a, g, c, TILES, splits, scale=0.5, seed_w=77)
        _close(w1 - w0, 0.35 * z)


def test_linear_clipped_sum_path_refused():
    a, g, c = _randn(2, 3, 4, seed=1), _randn(2, 3, 5, seed=2), _c(2)
    with pytest.raises(ValueError, match="path must be 0"):
        _clipped_sum_path(a, g, c, 3)
    with pytest.raises(ValueError, match="splits must be >= 0"):
        _clipped_sum_path(a, g, c, TILES, -1)


def test_bias_ops_f64():
    g, c = _randn(5, 7, 3, seed=7), _c(5)
    _close(cu.bias_norms(g), ref.bias_norms(g))
    # a strided view (a conv's (B, C, T) gradient seen as (B, T, C)) is read in place
    gt = _randn(5, 3, 7, seed=8).transpose(1, 2)
    _close(cu.bias_norms(gt), ref.bias_norms(gt))
    kw = dict(noise_std=0.0, scale=2.0, prev=_randn(3, seed=9))
    _close(cu.bias_clipped_sum(g, c, **kw), ref.bias_clipped_sum(g, c, **kw))


# ----------------------------------------------------------------------------- Conv

CONV_CASES = [
    # (x shape, C_out, kernel, stride, padding, dilation, groups)
    ((3, 4, 11), 6, 3, 2, 1, 1, 2),
    ((2, 3, 7, 6), 4, (3, 2), 1, (1, 0), (2, 1), 1),
    ((2, 2, 5, 4, 4), 4, 2, (1, 2, 1), 1, 1, 2),
]


def _conv_inputs(case, dtype=F64):
    shape, C_out, k, s, p, d, groups = case
    n = len(shape) - 2
    x = _randn(*shape, seed=10, dtype=dtype)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[n]
    kk = (k,) * n if isinstance(k, int) else k
    w = torch.zeros(C_out, shape[1] // groups, *kk, dtype=F64)
    out = conv(x.double(), w, stride=s, padding=p, dilation=d, groups=groups)
    g = _randn(*out.shape, seed=11, dtype=dtype)
    geom = dict(stride=s, padding=p, dilation=d, groups=groups)
    return x, g, kk, tuple(w.shape), geom


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("method", ["ghost", "inst"])
def test_conv_norms_f64(case, method):
    x, g, k, _, geom = _conv_inputs(case)
    kw = dict(kernel_size=k, bias=True, method=method, **geom)
    for got, want in zip(cu.conv_norms(x, g, **kw), ref.conv_norms(x, g, **kw)):
        _close(got, want)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_clipped_sum_f64(case):
    x, g, _, wshape, geom = _conv_inputs(case)
    c = _c(x.shape[0])
    kw = dict(weight_shape=wshape, bias=True, noise_std=0.0, scale=0.5, prev_w=_randn(*wshape, seed=12), **geom)
    for got, want in zip(cu.conv_clipped_sum(x, g, c, **kw), ref.conv_clipped_sum(x, g, c, **kw)):
        _close(got, want)


def _conv_clipped_path(x, g, c, wshape, geom, path, splits=0, noise_std=0.0, seed_w=0, scale=0.5, prev_w=None):
    geo = [[v] if isinstance(v, int) else list(v) for v in (geom["stride"], geom["padding"], geom["dilation"])]
    w, _ = torch.ops.dpkernels.cuda_conv_clipped_sum(
        x, g, c, list(wshape), *geo, geom["groups"], False, noise_std, scale, seed_w, 0, prev_w, None, path, splits
    )
    return w


# the CONV_CASES and a 2-d case wider than one 64 x 64 tile (C_out / groups = 70, C_in / groups * k = 5 * 16)
CONV_TILE_CASES = CONV_CASES + [((2, 10, 9, 8), 140, 4, (2, 1), (1, 2), 1, 2)]


@pytest.mark.parametrize("case", CONV_TILE_CASES)
@pytest.mark.parametrize("splits", [0, 1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_clipped_sum_tiles_f64(case, splits, channels_last):
    """The implicit-GEMM tiles (CUDA's conv clipped sum: the unfold gathered by the loader) and the ATen
    path against the reference, 1-3 spatial dims, stride / padding / dilation / groups, channels_last."""
    x, g, _, wshape, geom = _conv_inputs(case)
    if channels_last and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    c, prev = _c(x.shape[0]), _randn(*wshape, seed=80)
    want, _ = ref.conv_clipped_sum(x, g, c, weight_shape=wshape, bias=False, scale=0.5, prev_w=prev, **geom)
    _close(_conv_clipped_path(x, g, c, wshape, geom, TILES, splits, prev_w=prev), want)
    _close(_conv_clipped_path(x, g, c, wshape, geom, ATEN, prev_w=prev), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_clipped_sum_tiles_half(dtype):
    """16-bit inputs through the implicit-GEMM tiles, fp32 accumulation (SQNR_DB as for the Linear tiles),
    clip factors 1e-8 and 1e3 (c_i g leaves fp16's range both ways; the tiles multiply in fp32)."""
    x, g, _, wshape, geom = _conv_inputs(CONV_TILE_CASES[-1], dtype=dtype)
    g = (g.double() * 50).to(dtype)
    c = torch.tensor([1e-8, 1e3], dtype=torch.float32)
    got = _conv_clipped_path(x, g, c, wshape, geom, TILES, 2)
    want, _ = ref.conv_clipped_sum(
        x.double(), g.double(), c.double(), weight_shape=wshape, bias=False, scale=0.5, **geom
    )
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and _sqnr(got, want) > SQNR_DB


def test_conv_clipped_sum_tiles_noise():
    """The implicit-GEMM tiles' epilogue draws add_noise's z for seed_w (split and unsplit)."""
    x, g, _, wshape, geom = _conv_inputs(CONV_TILE_CASES[-1])
    c = _c(x.shape[0])
    z = cu.add_noise(None, wshape, noise_std=1.0, scale=1.0, seed=78, device="cpu", dtype=F64)
    for splits in (1, 2):
        w1 = _conv_clipped_path(x, g, c, wshape, geom, TILES, splits, noise_std=0.7, seed_w=78)
        w0 = _conv_clipped_path(x, g, c, wshape, geom, TILES, splits, seed_w=78)
        _close(w1 - w0, 0.35 * z)


def _conv_norms_path(x, g, k, geom, method, path, splits=0):
    geo = [[v] if isinstance(v, int) else list(v) for v in (geom["stride"], geom["padding"], geom["dilation"])]
    w, _ = torch.ops.dpkernels.cuda_conv_norms(x, g, list(k), *geo, geom["groups"], False, method, path, splits)
    return w


# the tile cases and ones past the norm tiles' edges: T = 132 (2-d, three 64-row Gram tiles, six pairs),
# T = 288 (3-d, dilation, groups), T = 36 with 1-d stride and dilation
CONV_NORM_CASES = CONV_TILE_CASES + [
    ((2, 4, 12, 11), 6, 3, 1, 1, 1, 1),
    ((2, 4, 6, 7, 8), 6, 2, 1, (0, 1, 1), (2, 1, 1), 2),
    ((3, 6, 80), 4, 5, 2, 2, 2, 2),
]


def _channels_last(x, g):
    if x.dim() == 3:
        return x, g
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)


@pytest.mark.parametrize("case", CONV_NORM_CASES)
@pytest.mark.parametrize("method", ["ghost", "inst"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_conv_norms_tiles_f64(case, method, layout):
    """The implicit-GEMM norm tiles (CUDA's conv norms: the unfold gathered by the loader, never written)
    and the ATen path against the reference: 1-3 spatial dims, stride / padding / dilation / groups,
    Gram tiles across T's 64-row edges, inst tiles across the (p, d) edges, split over t or not."""
    x, g, k, _, geom = _conv_inputs(case)
    if layout == "channels_last":
        x, g = _channels_last(x, g)
    elif layout == "strided":  # every other element of a wider tensor: no unit stride anywhere
        x, g = torch.cat([x, x], dim=-1)[..., ::2], torch.cat([g, g], dim=-1)[..., ::2]
    want, _ = ref.conv_norms(x, g, kernel_size=k, bias=False, method=method, **geom)
    for splits in (0, 1, 3, 1000) if method == "inst" else (0,):
        _close(_conv_norms_path(x, g, k, geom, method, TILES, splits), want)
    _close(_conv_norms_path(x, g, k, geom, method, ATEN), want)


def test_conv_norms_tiles_random_geometry():
    """Random conv geometries (seeded): the tiles' index arithmetic (row and column decompositions, padding
    bounds, groups) against the reference's unfold, both methods, float64."""
    rng = torch.Generator().manual_seed(2024)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    for trial in range(16):
        n, groups = pick(1, 3), pick(1, 3)
        k = [pick(1, 3) for _ in range(n)]
        s, p, d = [pick(1, 2) for _ in range(n)], [pick(0, 2) for _ in range(n)], [pick(1, 2) for _ in range(n)]
        size = [max(pick(3, {1: 40, 2: 11, 3: 6}[n]), d[q] * (k[q] - 1) + 1) for q in range(n)]
        shape = (pick(1, 3), groups * pick(1, 3), *size)
        case = (shape, groups * pick(1, 3), tuple(k), tuple(s), tuple(p), tuple(d), groups)
        x, g, kk, _, geom = _conv_inputs(case)
        for method in ("ghost", "inst"):
            want, _ = ref.conv_norms(x, g, kernel_size=kk, bias=False, method=method, **geom)
            _close(_conv_norms_path(x, g, kk, geom, method, TILES, trial % 3), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["ghost", "inst"])
def test_conv_norms_tiles_half(dtype, method):
    """16-bit inputs through the norm tiles, fp32 accumulation, by SQNR against the reference in float64 on
    the same rounded values (SQNR_DB: products of 16-bit values are exact in fp32, the sums are fp32's).
    g is scaled by 300 so that fp16 products of g would overflow (300^2 * 4 > 65504): the tiles multiply
    in fp32, where they never are fp16."""
    x, g, k, _, geom = _conv_inputs(CONV_NORM_CASES[-3], dtype=dtype)
    g = (g.double() * 300).to(dtype)
    got = _conv_norms_path(x, g, k, geom, method, TILES)
    want, _ = ref.conv_norms(x.double(), g.double(), kernel_size=k, bias=False, method=method, **geom)
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and _sqnr(got, want) > SQNR_DB


def test_conv_norms_tiles_mixed_and_empty():
    """x and g of different dtypes accumulate in the wider one (the reference's acc dtype); an empty batch
    gives an empty (0,) result on both paths."""
    x, g, k, _, geom = _conv_inputs(CONV_CASES[1])
    want, _ = ref.conv_norms(x.float(), g, kernel_size=k, bias=False, method="ghost", **geom)
    _close(_conv_norms_path(x.float(), g, k, geom, "ghost", TILES), want)
    for path in (TILES, ATEN):
        for method in ("ghost", "inst"):
            out = _conv_norms_path(x[:0], g[:0], k, geom, method, path)
            assert out.shape == (0,) and out.dtype == F64


def _allocated_bytes(fn):
    """Bytes the ops under fn allocate on the CPU (the profiler's allocation events, frees not subtracted)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.key_averages() if e.self_cpu_memory_usage > 0)


# a 3x3 conv of 16 channels on 32x32: the unfold is (B, T, C_in k^2) = (2, 1024, 144) float64, 2.4 MB
NO_UNFOLD_CASE = ((2, 16, 32, 32), 8, 3, 1, 1, 1, 1)


@pytest.mark.parametrize("method", ["ghost", "inst"])
def test_conv_norms_tiles_never_unfold(method):
    """The tiles allocate their block partials only (a few kB), never the unfold; the same count sees the
    ATen path's materialised unfold (so the measure can fail)."""
    x, g, k, _, geom = _conv_inputs(NO_UNFOLD_CASE)
    unfold_bytes = 2 * 1024 * 144 * 8
    tiles = _allocated_bytes(lambda: _conv_norms_path(x, g, k, geom, method, TILES))
    aten = _allocated_bytes(lambda: _conv_norms_path(x, g, k, geom, method, ATEN))
    assert aten >= unfold_bytes
    assert tiles < unfold_bytes / 100


def test_conv_norms_refused():
    x, g, k, _, geom = _conv_inputs(CONV_CASES[1])
    with pytest.raises(ValueError, match="path must be 0"):
        _conv_norms_path(x, g, k, geom, "ghost", 3)
    with pytest.raises(ValueError, match="splits must be >= 0"):
        _conv_norms_path(x, g, k, geom, "inst", TILES, -1)
    for path in (TILES, ATEN):  # g of another conv's output size, named in the error
        with pytest.raises(ValueError, match="output gradient of shape"):
            _conv_norms_path(x, g[..., :-1], k, geom, "ghost", path)


# ----------------------------------------------------------------------------- Embedding

V = 11


def _ids(B=4, T=9, seed=13):
    return torch.randint(0, 5, (B, T), generator=_gen(seed))  # ids 0..4 of 11: many repeats, rows untouched


@pytest.mark.parametrize("padding_idx", [None, 2, -9])
def test_embedding_ops_f64(padding_idx):
    ids = _ids()
    g = _randn(4, 9, 6, seed=14)
    if padding_idx is not None:  # a non-finite gradient at a padding position must not leak in
        g[ids == padding_idx % V] = float("nan")
    _close(
        cu.embedding_norms(ids, g, num_embeddings=V, padding_idx=padding_idx),
        ref.embedding_norms(ids, g, num_embeddings=V, padding_idx=padding_idx),
    )
    kw = dict(num_embeddings=V, padding_idx=padding_idx, noise_std=0.0, scale=0.5, prev=_randn(V, 6, seed=15))
    _close(cu.embedding_clipped_sum(ids, g, _c(4), **kw), ref.embedding_clipped_sum(ids, g, _c(4), **kw))
    a, gh = _randn(4, 7, 6, seed=16), _randn(4, 7, V, seed=17)
    ge = g.nan_to_num()
    _close(
        cu.embedding_linear_cross(ids, ge, a, gh, padding_idx=padding_idx),
        ref.embedding_linear_cross(ids, ge, a, gh, padding_idx=padding_idx),
    )


def test_embedding_out_of_range_ids_refused():
    ids = _ids()
    ids[0, 0] = V
    with pytest.raises(ValueError, match="num_embeddings"):
        cu.embedding_clipped_sum(ids, _randn(4, 9, 6, seed=14), _c(4), num_embeddings=V, padding_idx=None)


# ----------------------------------------------------------------------------- affine and add_noise


@pytest.mark.parametrize("weight, bias", [(True, True), (True, False), (False, True)])
def test_affine_ops_f64(weight, bias):
    xhat, g, c = _randn(3, 5, 8, seed=18), _randn(3, 5, 8, seed=19), _c(3)
    for got, want in zip(
        cu.affine_norms(xhat, g, weight=weight, bias=bias), ref.affine_norms(xhat, g, weight=weight, bias=bias)
    ):
        _close(got, want)
    kw = dict(weight=weight, bias=bias, noise_std=0.0, scale=3.0, prev_w=_randn(8, seed=20), prev_b=_randn(8, seed=21))
    for got, want in zip(cu.affine_clipped_sum(xhat, g, c, **kw), ref.affine_clipped_sum(xhat, g, c, **kw)):
        _close(got, want)


def test_add_noise_without_noise_is_scaled_prev():
    prev = _randn(4, 5, seed=22)
    _close(
        cu.add_noise(prev, (4, 5), noise_std=0.0, scale=0.5, seed=1, device="cpu", dtype=F64),
        ref.add_noise(prev, (4, 5), noise_std=0.0, scale=0.5, seed=1, device="cpu", dtype=F64),
    )


# ----------------------------------------------------------------------------- bfloat16


def _bf16_cases():
    """(name, fn(module, cast)): ``cast`` applied to the data tensors (not to c, fp64 for both sides)."""
    a, g, c = _randn(4, 16, 32, seed=30), _randn(4, 16, 24, seed=31), _c(4)
    ids = torch.randint(0, 7, (4, 16), generator=_gen(32))
    xhat = _randn(4, 16, 24, seed=33)
    x, gc, k, wshape, geom = _conv_inputs(CONV_CASES[1])
    yield "linear_norms_ghost", lambda m, d: m.linear_norms(d(a), d(g), bias=True, method="ghost")
    yield "linear_norms_inst", lambda m, d: m.linear_norms(d(a), d(g), bias=True, method="inst")
    yield "linear_clipped_sum", lambda m, d: m.linear_clipped_sum(d(a), d(g), c, bias=True)
    yield "conv_norms", lambda m, d: m.conv_norms(d(x), d(gc), kernel_size=k, bias=True, method="ghost", **geom)
    yield (
        "conv_clipped_sum",
        lambda m, d: m.conv_clipped_sum(d(x), d(gc), c[:2], weight_shape=wshape, bias=True, **geom),
    )
    yield "embedding_norms", lambda m, d: (m.embedding_norms(ids, d(g), num_embeddings=7, padding_idx=1),)
    yield (
        "embedding_clipped_sum",
        lambda m, d: (m.embedding_clipped_sum(ids, d(g), c, num_embeddings=7, padding_idx=None),),
    )
    yield (
        "embedding_linear_cross",
        lambda m, d: (m.embedding_linear_cross(ids, d(g[..., :8]), d(a[..., :8]), d(xhat[..., :7]), padding_idx=1),),
    )
    yield "affine_norms", lambda m, d: m.affine_norms(d(xhat), d(g), weight=True, bias=True)
    yield "affine_clipped_sum", lambda m, d: m.affine_clipped_sum(d(xhat), d(g), c, weight=True, bias=True)


@pytest.mark.parametrize("name, fn", list(_bf16_cases()), ids=[n for n, _ in _bf16_cases()])
def test_bf16_by_sqnr(name, fn):
    """bf16 inputs against the reference in float64 on the same bf16-rounded values."""
    got = fn(cu, lambda t: t.to(torch.bfloat16))
    want = fn(ref, lambda t: t.to(torch.bfloat16).to(F64))
    for out, w in zip(got, want):
        assert out.dtype == torch.float32  # accumulated and returned in fp32
        assert _sqnr(out, w) > SQNR_DB, name


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    a, g = _randn(3, 5, 7, seed=1), _randn(3, 5, 4, seed=2)
    with pytest.raises(ValueError, match="c must hold one clip factor per sample"):
        cu.linear_clipped_sum(a, g, _c(2), bias=False)
    with pytest.raises(ValueError, match="method must be 'ghost' or 'inst'"):
        cu.linear_norms(a, g, bias=False, method="gram")
    with pytest.raises(ValueError, match="a must be"):
        cu.linear_norms(a[:2], g, bias=False, method="inst")
    with pytest.raises(ValueError, match="prev_w must have the output's shape"):
        cu.linear_clipped_sum(a, g, _c(3), bias=False, prev_w=_randn(4, 6, seed=0))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        cu.bias_norms(torch.ones(2, 3, 4, dtype=torch.int32))


# ----------------------------------------------------------------------------- torch.library


def _opcheck_cases():
    f32 = torch.float32
    a, g, c = _randn(2, 3, 4, seed=40, dtype=f32), _randn(2, 3, 5, seed=41, dtype=f32), _c(2, dtype=f32)
    ids = torch.tensor([[0, 1, 1], [2, 0, 2]])
    x, gc, k, wshape, geom = _conv_inputs(CONV_CASES[0], dtype=f32)
    st = [geom["stride"]], [geom["padding"]], [geom["dilation"]], geom["groups"]
    ops = torch.ops.dpkernels
    yield "linear_norms", ops.cuda_linear_norms.default, (a, g, True, "ghost")
    yield "linear_clipped_sum", ops.cuda_linear_clipped_sum.default, (a, g, c, True, 1.0, 0.5, 1, 2, None, None)
    yield (
        "linear_clipped_sum_tiles",
        ops.cuda_linear_clipped_sum.default,
        (a, g, c, True, 1.0, 0.5, 1, 2, torch.ones(5, 4), None, 1, 2),
    )
    yield "bias_norms", ops.cuda_bias_norms.default, (g,)
    yield "bias_clipped_sum", ops.cuda_bias_clipped_sum.default, (g, c, 1.0, 1.0, 3, torch.zeros(5))
    yield "conv_norms", ops.cuda_conv_norms.default, (x, gc, list(k), *st, True, "inst")
    yield "conv_norms_tiles", ops.cuda_conv_norms.default, (x, gc, list(k), *st, True, "ghost", 1, 0)
    yield "conv_norms_tiles_split", ops.cuda_conv_norms.default, (x, gc, list(k), *st, False, "inst", 1, 2)
    yield (
        "conv_clipped_sum",
        ops.cuda_conv_clipped_sum.default,
        (x, gc, _c(3, dtype=f32), list(wshape), *st, True, 1.0, 1.0, 4, 5, None, None),
    )
    yield "embedding_norms", ops.cuda_embedding_norms.default, (ids, g, 4, 1)
    yield "embedding_clipped_sum", ops.cuda_embedding_clipped_sum.default, (ids, g, c, 4, None, 1.0, 1.0, 6, None)
    yield "embedding_linear_cross", ops.cuda_embedding_linear_cross.default, (ids, g, 0.5 * g, a, 0)
    yield "affine_norms", ops.cuda_affine_norms.default, (g, g, True, False)
    yield "affine_clipped_sum", ops.cuda_affine_clipped_sum.default, (g, g, c, True, True, 1.0, 1.0, 7, 8, None, None)
    yield "add_noise", ops.cuda_add_noise.default, (torch.empty(0), None, [3, 4], 1.0, 2.0, 9)


@pytest.mark.parametrize("name, op, args", list(_opcheck_cases()), ids=[n for n, *_ in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    a, g, c = _randn(3, 4, 5, seed=50, dtype=torch.float32), _randn(3, 4, 6, seed=51, dtype=torch.float32), _c(3)

    def step(a, g, c):
        n, nb = cu.linear_norms(a, g, bias=True, method="ghost")
        w, b = cu.linear_clipped_sum(a, g, c * (n + nb).rsqrt(), bias=True, noise_std=1.0, seed_w=1, seed_b=2)
        return w, b

    eager = step(a, g, c.float())
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(a, g, c.float())
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the dispatcher


def test_selected_by_name_on_cpu_tensors():
    assert "cuda" in dpkernels.ops.available_backends()
    a, g = _randn(3, 5, 7, seed=1), _randn(3, 5, 4, seed=2)
    dpkernels.ops.set_backend("cuda")
    w, b = dpkernels.ops.linear_norms(a, g, bias=True, method="inst")
    assert dpkernels.ops.last_backend["linear_norms"] == "cuda"
    _close(w, ref.linear_norms(a, g, bias=True, method="inst")[0])
    out = dpkernels.ops.add_noise(None, (3,), noise_std=1.0, scale=1.0, seed=1, device="cpu")
    assert dpkernels.ops.last_backend["add_noise"] == "cuda"
    torch.testing.assert_close(out, cu.add_noise(None, (3,), noise_std=1.0, scale=1.0, seed=1, device="cpu"))


def test_automatic_choice_on_cpu_keeps_the_reference():
    a, g = _randn(3, 5, 7, seed=1), _randn(3, 5, 4, seed=2)
    dpkernels.ops.linear_norms(a, g, bias=True, method="inst")
    assert dpkernels.ops.last_backend["linear_norms"] == "reference"


# ----------------------------------------------------------------------------- on a GPU


def _dtype_id(dt):  # "float32": bench/gpu_cuda.sh selects the sanitizer's cases by it
    return str(dt).removeprefix("torch.")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=_dtype_id)
def test_ops_on_cuda_match_the_reference(dtype):
    """Every op of the CUDA build on the GPU against the reference on the CPU (fp64 tight, else SQNR)."""
    if not torch.cuda.is_available() or not cu.info["cuda"]:
        pytest.skip("needs a GPU and the CUDA build of the library")

    for name, fn in _bf16_cases():
        got = fn(_OnCuda(), lambda t: t.to(dtype).cuda())
        want = fn(ref, lambda t: t.to(dtype).to(F64))
        for out, w in zip(got, want):
            assert out.is_cuda, name
            if dtype == F64:
                torch.testing.assert_close(out.cpu(), w, **TIGHT)
            else:
                assert _sqnr(out.cpu(), w) > SQNR_DB, name


class _OnCuda:
    """The compiled ops with every tensor argument moved to the GPU."""

    def __getattr__(self, name):
        op = getattr(cu, name)

        def call(*args, **kw):
            args = [a.cuda() if torch.is_tensor(a) else a for a in args]
            return op(*args, **kw)

        return call


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16], ids=_dtype_id)
def test_linear_clipped_sum_tiles_on_cuda(dtype):
    """The tile kernel on the GPU (unsplit, split, automatic) against the reference in float64 on the same
    rounded inputs (fp64 tight, else SQNR), every layout, and its noise: the CPU build's element by element."""
    if not torch.cuda.is_available() or not cu.info["cuda"]:
        pytest.skip("needs a GPU and the CUDA build of the library")
    for B, T, p, d in [(3, 7, 5, 9), (2, 40, 65, 130), (9, 300, 33, 64), (16, 64, 130, 192)]:
        for layout in ("contiguous", "transposed", "strided", "expanded"):
            a = _layout(_randn(B, T, d, seed=70, dtype=dtype), layout)
            g = _layout(_randn(B, T, p, seed=71, dtype=dtype), layout)
            c = _c(B, dtype=torch.float32 if dtype != F64 else F64)
            prev = _randn(p, d, seed=72, dtype=c.dtype)
            want = ref.linear_clipped_sum(
                a.double(), g.double(), c.double(), bias=True, scale=0.5, prev_w=prev.double()
            )
            for splits in (0, 1, 5):
                w, b = _clipped_sum_path(a.cuda(), g.cuda(), c.cuda(), TILES, splits, scale=0.5, prev_w=prev.cuda())
                for out, ww in zip((w.cpu(), b.cpu()), want):
                    if dtype == F64:
                        torch.testing.assert_close(out, ww, **TIGHT)
                    else:
                        assert _sqnr(out, ww) > SQNR_DB, (B, T, p, d, layout, splits)
    a, g, c = _randn(3, 20, 70, seed=73), _randn(3, 20, 66, seed=74), _c(3)
    for splits in (1, 3):
        on_cpu = _clipped_sum_path(a, g, c, TILES, splits, noise_std=0.7, seed_w=5)[0]
        on_gpu = _clipped_sum_path(a.cuda(), g.cuda(), c.cuda(), TILES, splits, noise_std=0.7, seed_w=5)[0].cpu()
        # the same functor, the same Philox; device logf/cosf within 2 ulp of the host's (0.7 * 4e-6)
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-10, atol=4e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=_dtype_id)
def test_conv_clipped_sum_tiles_on_cuda(dtype):
    """The implicit-GEMM conv tiles on the GPU (automatic path: tiles on CUDA; split and unsplit) against
    the reference in float64 on the same rounded inputs, channels_last too."""
    if not torch.cuda.is_available() or not cu.info["cuda"]:
        pytest.skip("needs a GPU and the CUDA build of the library")
    for case in CONV_TILE_CASES:
        for channels_last in (False, True):
            x, g, _, wshape, geom = _conv_inputs(case, dtype=dtype)
            if channels_last and x.dim() in (4, 5):
                fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
                x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
            c = _c(x.shape[0], dtype=F64 if dtype == F64 else torch.float32)
            want, _ = ref.conv_clipped_sum(
                x.double(), g.double(), c.double(), weight_shape=wshape, bias=False, scale=0.5, **geom
            )
            for splits in (0, 1, 3):
                got = _conv_clipped_path(x.cuda(), g.cuda(), c.cuda(), wshape, geom, 0, splits).cpu()
                if dtype == F64:
                    torch.testing.assert_close(got, want, **TIGHT)
                else:
                    assert _sqnr(got, want) > SQNR_DB, (case, channels_last, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16], ids=_dtype_id)
def test_conv_norms_tiles_on_cuda(dtype):
    """The implicit-GEMM norm kernels on the GPU (automatic path: tiles on CUDA; inst split and unsplit)
    against the reference in float64 on the same rounded inputs (fp64 tight, else SQNR), every layout."""
    if not torch.cuda.is_available() or not cu.info["cuda"]:
        pytest.skip("needs a GPU and the CUDA build of the library")
    for case in CONV_NORM_CASES:
        for layout in ("contiguous", "channels_last", "strided"):
            x, g, k, _, geom = _conv_inputs(case, dtype=dtype)
            if layout == "channels_last":
                x, g = _channels_last(x, g)
            elif layout == "strided":
                x, g = torch.cat([x, x], dim=-1)[..., ::2], torch.cat([g, g], dim=-1)[..., ::2]
            for method in ("ghost", "inst"):
                want, _ = ref.conv_norms(x.double(), g.double(), kernel_size=k, bias=False, method=method, **geom)
                for splits in (0, 1, 3) if method == "inst" else (0,):
                    got = _conv_norms_path(x.cuda(), g.cuda(), k, geom, method, 0, splits).cpu()
                    if dtype == F64:
                        torch.testing.assert_close(got, want, **TIGHT)
                    else:
                        assert _sqnr(got, want) > SQNR_DB, (case, layout, method, splits)


@pytest.mark.gpu
def test_conv_norms_tiles_memory_on_cuda():
    """On the GPU the norm kernels' peak memory is their partials, not the unfold (2.4 MB here in fp64)."""
    if not torch.cuda.is_available() or not cu.info["cuda"]:
        pytest.skip("needs a GPU and the CUDA build of the library")
    x, g, k, _, geom = _conv_inputs(NO_UNFOLD_CASE)
    x, g = x.cuda(), g.cuda()
    for method in ("ghost", "inst"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _conv_norms_path(x, g, k, geom, method, 0)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base < 2 * 1024 * 144 * 8 / 100, method
