"""The Triton kernels' certified bounds (dpkernels/ops/triton/linear_norms.py, affine.py, embedding.py,
and conv.py's on the unfolded rows): upper bounds on the exact squared norms of the stored tensors,
value + err and cap each on its own (the cap could hide a wrong err), on natural data close to the
exact norm, and served by dpkernels.ops.certified for the Triton backend in place of the generic
certificate. Under TRITON_INTERPRET=1: small shapes, crossing the kernels' tiles (T = 70: two Gram
tiles, an off-diagonal pair; p = 130: two output tiles; embedding: T = 70, 150, past the raw norm's
64-token Gram tile)."""

from __future__ import annotations

import pytest
import torch
from _device import DEVICE

from dpkernels import ops
from dpkernels.ops import certified

tt = pytest.importorskip("dpkernels.ops.triton")

SHAPES = [(2, 70, 20, 33), (3, 5, 7, 9), (1, 33, 130, 5), (3, 1, 17, 130)]  # (B, T, d, p); T = 1: token norms
HALF = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _exact(a, g):
    w = torch.stack([(gi.double().T @ ai.double()).square().sum() for ai, gi in zip(a, g, strict=True)])
    return w, g.double().sum(1).square().sum(1)


def _rows(B, T, d, p, dtype, seed=0, scale_a=1.0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d, generator=gen, dtype=torch.float64) * scale_a
    g = torch.randn(B, T, p, generator=gen, dtype=torch.float64)
    return a.to(DEVICE, dtype), g.to(DEVICE, dtype)


def _holds(b, exact, what):
    """value + err and the cap are each upper bounds; certified() too."""
    up = (b.value + b.err).cpu()
    assert bool((up >= exact).all()), f"{what}: value + err {up.tolist()} < exact {exact.tolist()}"
    assert bool((b.cap.cpu() >= exact).all()), f"{what}: cap {b.cap.tolist()} < exact {exact.tolist()}"
    assert bool((b.certified().cpu() >= exact).all()), what


@pytest.mark.parametrize("method", ["ghost", "inst"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_natural_data_tight(shape, dtype, method):
    a, g = _rows(*shape, dtype)
    ew, eb = _exact(a.cpu(), g.cpu())
    w, b = tt.linear_norms_bound(a, g, bias=True, method=method)
    _holds(w, ew, f"weight {method}")
    _holds(b, eb, "bias")
    # the bounds' relative terms are gamma_{d+1}(2^-23)-sized times the weights of the error sums (a few
    # times the norm here): measured <= 2.1e-4 at these shapes; 1e-3 as for the reference's bounds.
    assert (w.certified().cpu() / ew - 1).max().item() <= 1e-3
    # the bias is summed in float64: gamma_T(2^-53)-sized
    assert (b.certified().cpu() / eb - 1).max().item() <= 1e-10


@pytest.mark.parametrize("method", ["ghost", "inst"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["cancel", "huge", "max", "tiny", "mixed"])
def test_adversarial_data(kind, dtype, method):
    """cancel: token pairs (a, a + delta) with gradients (w, -w), so the float32 ghost value cancels;
    huge / tiny: magnitudes whose float32 Grams overflow / underflow unscaled; max: near float32's
    largest value (token norms past 2^124: the cap serves); mixed: one sample huge, one tiny."""
    B, T, d, p = 2, 70, 6, 5
    a, g = _rows(B, T, d, p, torch.float64, seed=1)
    if kind == "cancel":
        a[:, 1::2] = a[:, 0::2] + 1e-6 * a[:, 1::2]
        a, g = a * 1e3, g.clone()
        g[:, 1::2] = -g[:, 0::2]
    elif kind in ("huge", "tiny", "max"):
        a = a * {"huge": 1e30, "tiny": 1e-35, "max": 1e37}[kind]
    else:
        a[0] *= 1e30
        a[1] *= 1e-30
    a, g = a.to(dtype), g.to(dtype)
    ew, eb = _exact(a, g)
    w, b = tt.linear_norms_bound(a, g, bias=True, method=method)
    _holds(w, ew, f"weight {method} {kind}")
    _holds(b, eb, f"bias {kind}")
    assert bool(torch.isfinite(w.certified()).all())
    if kind in ("huge", "tiny", "mixed"):  # scaled per tile / sample: still tight
        assert (w.certified() / ew - 1).max().item() <= 1e-3


def test_float16_unscaled_and_float64_by_the_reference():
    a, g = _rows(2, 40, 9, 7, torch.float16, seed=2)
    a = a * 3e3  # large float16 values: their float32 Grams neither overflow nor underflow
    ew, eb = _exact(a, g)
    for method in ("ghost", "inst"):
        w, b = tt.linear_norms_bound(a, g, bias=True, method=method)
        _holds(w, ew, method)
        assert (w.certified() / ew - 1).max().item() <= 1e-3
    a64, g64 = a.double() * 1e200, g.double()
    w, _ = tt.linear_norms_bound(a64, g64, bias=False, method="ghost")
    wr, _ = ops.reference.linear_norms_bound(a64, g64, bias=False, method="ghost")
    assert torch.equal(w.certified(), wr.certified())


def test_non_finite_input_gives_non_finite_norm():
    a, g = _rows(2, 20, 6, 5, torch.float32, seed=3)
    a[1, 3, 2] = float("inf")
    g[0, 5, 1] = float("nan")
    for method in ("ghost", "inst"):
        w, b = tt.linear_norms_bound(a, g, bias=True, method=method)
        assert not bool(torch.isfinite(w.certified()).any()), method
        assert not bool(torch.isfinite(b.certified()[0]))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_affine_bounds(dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 21, 130, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 21, 130, generator=gen, dtype=torch.float64)
    g[:, -1] = -g[:, :-1].sum(1) + 1e-4 * g[:, -1]  # the bias gradient cancels
    x, g = x.to(DEVICE, dtype), g.to(DEVICE, dtype)
    ew = (x.double() * g.double()).sum(1).square().sum(1).cpu()
    eb = g.double().sum(1).square().sum(1).cpu()
    w, b = tt.affine_norms_bound(x, g, weight=True, bias=True)
    _holds(w, ew, "affine weight")
    _holds(b, eb, "affine bias")
    assert (w.certified().cpu() / ew - 1).max().item() <= 1e-10  # float64 sums: gamma_T(2^-53)-sized
    assert tt.affine_norms_bound(x, g, weight=False, bias=True)[0] is None


def test_certified_serves_the_kernels_bounds(monkeypatch):
    """dpkernels.ops.certified finds the Triton backend's own bounds (not the generic certificate)."""
    a, g = _rows(2, 10, 6, 5, torch.float32)
    own, _ = certified._own("linear_norms", "triton", a, g, bias=True, method="ghost")
    assert own is tt.linear_norms_bound
    assert certified._own("bias_norms", "triton", g)[0] is tt.bias_norms_bound
    assert certified._own("affine_norms", "triton", a, a, weight=True, bias=True)[0] is tt.affine_norms_bound
    monkeypatch.setattr(certified, "generic_bound", lambda *a, **k: pytest.fail("generic certificate used"))
    w, b = certified.linear_norms(a, g, bias=True, method="inst", backend="triton")
    ew, eb = _exact(a, g)
    assert bool((w >= ew).all()) and bool((b >= eb).all())


@pytest.mark.parametrize("name", ["linear_norms_ghost_bound", "linear_norms_inst_bound", "sum_bound", "token_norms"])
def test_opcheck(name):
    """The bound ops are torch.library custom ops with fake impls (torch.compile traces through them)."""
    a, g = _rows(2, 5, 7, 9, torch.float32)
    args = (g, g, True) if name == "sum_bound" else (a, g)
    torch.library.opcheck(getattr(torch.ops.dpkernels, f"triton_{name}").default, args)


def test_launches():
    """ghost: the token-norm pre-pass and the bound's tiles; the bias: one float64 column-sum kernel."""
    from dpkernels.ops.triton._common import observe_launches
    from dpkernels.ops.triton.linear_norms import ghost_bound_config

    a, g = _rows(2, 70, 6, 5, torch.float32)
    with observe_launches() as seen:
        tt.linear_norms_bound(a, g, bias=True, method="ghost")
    assert [x.kernel.__name__ for x in seen] == ["_token_norms_kernel", "_ghost_bound_kernel", "_sum_bound_kernel"]
    n = -(-70 // ghost_bound_config(70, 6, 5, torch.float32)["BLOCK_T"])  # T-tiles
    assert n >= 2 and seen[1].grid == (2 * n * (n + 1) // 2,)  # one program per pair I <= J


# ----------------------------------------------------------------------------- embedding

V_SMALL = 5  # few ids: every sample repeats them


def _exact_embedding(ids, g, padding_idx=None):
    """sum_v ||sum_{t: x_t = v} g_t||^2 of the stored g, per sample: math.fsum per (id, column) (the
    correctly rounded float64 sum), squares and their fsum: within a few float64 ulps of exact."""
    import math

    out = []
    for x, rows in zip(ids.tolist(), g.double().cpu().tolist(), strict=True):
        sums: dict[int, list[list[float]]] = {}
        for v, row in zip(x, rows, strict=True):
            if v != padding_idx:
                sums.setdefault(v, []).append(row)
        out.append(math.fsum(math.fsum(col) ** 2 for rs in sums.values() for col in zip(*rs, strict=True)))
    return torch.tensor(out, dtype=torch.float64)


def _emb_bound(ids, g, padding_idx=None, V=V_SMALL):
    return tt.embedding_norms_bound(ids, g, num_embeddings=V, padding_idx=padding_idx)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("T", [40, 70])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_natural_data_tight(T, dtype, padding_idx):
    """Transposed (non-contiguous) ids and g; inflation within float64 sums' gamma-sized error."""
    gen = torch.Generator().manual_seed(T)
    ids = torch.randint(0, V_SMALL, (T, 3), generator=gen).to(DEVICE).t()
    g = torch.randn(T, 3, 40, generator=gen, dtype=torch.float64).to(DEVICE, dtype).transpose(0, 1)
    exact = _exact_embedding(ids, g, padding_idx)
    b = _emb_bound(ids, g, padding_idx)
    _holds(b, exact, f"embedding T={T}")
    # float64 sums: err ~ gamma_m(2^-53) per unit of the run's |g| sums, m = BLOCK_T + cdiv(T, BLOCK_T) + 2,
    # and the round-up factors: measured <= 5e-13 here; 1e-10 is still 1e6 below the Linear kernels' 2.1e-4.
    assert (b.certified().cpu() / exact - 1).max().item() <= 1e-10


def _adversarial(kind, dtype, T, gen):
    B, D = 2, 12
    ids = torch.randint(0, V_SMALL, (B, T), generator=gen)
    g = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    if kind == "cancel":  # id 1 at the even positions, with gradients w and -w + delta in turn
        ids[:, 0::2] = 1
        g[:, 2::4] = -g[:, 0:-2:4] + 1e-6 * g[:, 2::4]
    elif kind == "absorb":  # 2^60, 1, -2^60 in one run and column: float64 sums lose the 1 (err must cover it)
        ids[:, :3], ids[:, 3:] = 4, ids[:, 3:] % 4  # a run of these three tokens only
        g[:, :3, 0] = torch.tensor([2.0**60, 1.0, -(2.0**60)], dtype=torch.float64)
    elif kind == "subnormal":  # bf16 entries of both signs in [0.5e-40, 1.5e-40], none 0
        mag = (torch.rand(B, T, D, generator=gen, dtype=torch.float64) + 0.5) * 1e-40
        g = torch.where(g < 0, -mag, mag)
    elif kind == "mixed":  # one run huge, the others tiny, in the same sample
        g = g * 1e-30
        g[:, 3] *= 1e48
    else:
        big = {torch.float32: 3e38, torch.bfloat16: 3e38, torch.float16: 6e4}[dtype]
        tiny = {torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 1e-4}[dtype]
        scale = {"huge": 1e18 if dtype != torch.float16 else 1e3, "max": big, "tiny": tiny}[kind]
        g = g / g.abs().amax() * scale if kind == "max" else g * scale
    return ids.to(DEVICE), g.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["cancel", "huge", "max", "tiny", "mixed", "subnormal", "absorb"])
@pytest.mark.parametrize("T", [9, 150])
def test_embedding_adversarial_data(kind, dtype, T):
    """cancel: the same id with gradients w and -w + delta (float32 sums lose the delta); huge / max /
    tiny: 1e18, 3e38 (float32's and bf16's edge; float16: 6e4), 1e-30; mixed: one token 1e48 times the
    rest; subnormal: bf16 subnormals (float32's exponent range; other dtypes round them to 0 or keep
    them as float32 subnormals); absorb: a run whose float64 sum rounds a term away (the err term is
    what bounds it). T = 150: long runs of few ids."""
    if kind in ("subnormal", "absorb") and dtype == torch.float16:
        pytest.skip("float16's exponent range: no float32-range subnormals, float64 sums of it are exact")
    if kind == "mixed" and dtype == torch.float16:
        pytest.skip("1e-30 and 1e18 are outside float16's range")
    gen = torch.Generator().manual_seed(7)
    ids, g = _adversarial(kind, dtype, T, gen)
    if kind == "subnormal":
        assert bool((g != 0).all())
    exact = _exact_embedding(ids, g)
    assert bool((exact > 0).all())
    b = _emb_bound(ids, g)
    _holds(b, exact, f"embedding {kind} T={T}")
    c = b.certified().cpu()
    assert bool(torch.isfinite(c).all())
    if kind == "absorb":  # value misses the 1 of a sample whose norm is ~T: the err term carries it
        assert bool((b.value.cpu() < exact).any())
    else:  # float64 sums of exactly read values: tight whatever the scale (cancelling runs keep their delta)
        assert (c / exact - 1).max().item() <= 1e-10, kind


def test_embedding_non_finite_and_padding():
    """A non-finite gradient row gives a non-finite norm for its sample only; at a padding position it
    is never read (the reference's convention)."""
    gen = torch.Generator().manual_seed(3)
    for T in (20, 80):
        ids = torch.randint(0, V_SMALL, (2, T), generator=gen).to(DEVICE)
        g = torch.randn(2, T, 12, generator=gen).to(DEVICE)
        ids[0, 3], ids[1, 4] = 2, 3
        g[0, 3, 1], g[1, 4, 0] = float("inf"), float("nan")
        c = _emb_bound(ids, g, padding_idx=3).certified().cpu()
        assert not bool(torch.isfinite(c[0])) and bool(torch.isfinite(c[1])), T
        assert bool(c[1] >= _exact_embedding(ids[1:], g[1:], padding_idx=3)[0])


def test_embedding_certified_serves_the_kernel_bound(monkeypatch):
    """dpkernels.ops.certified serves the Triton kernel's bound (not the generic certificate): no
    generic_bound, and the bound's kernel is launched; float64 g goes to the reference's bound."""
    from dpkernels.ops.triton._common import observe_launches

    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V_SMALL, (2, 70), generator=gen).to(DEVICE)
    g = torch.randn(2, 70, 12, generator=gen).to(DEVICE)
    own, _ = certified._own("embedding_norms", "triton", ids, g, num_embeddings=V_SMALL, padding_idx=None)
    assert own is tt.embedding_norms_bound
    monkeypatch.setattr(certified, "generic_bound", lambda *a, **k: pytest.fail("generic certificate used"))
    with observe_launches() as seen:
        c = certified.embedding_norms(ids, g, num_embeddings=V_SMALL, padding_idx=None, backend="triton")
    assert [x.kernel.__name__ for x in seen] == ["_embedding_bound_kernel"]
    assert seen[0].grid == (2,)  # D = 12: one D-tile a sample
    assert bool((c >= _exact_embedding(ids, g)).all())
    b64 = _emb_bound(ids, g.double())
    r64 = ops.reference.embedding_norms_bound(ids, g.double(), num_embeddings=V_SMALL, padding_idx=None)
    assert torch.equal(b64.certified(), r64.certified())


def test_embedding_bound_opcheck():
    ids = torch.randint(0, V_SMALL, (2, 70))
    g = torch.randn(2, 70, 12)
    torch.library.opcheck(torch.ops.dpkernels.triton_embedding_norms_bound.default, (ids, g, V_SMALL, None))


# ----------------------------------------------------------------------------- conv


def _exact_conv(x, g, geom):
    return ops.reference.conv_norms(x.double().cpu(), g.double().cpu(), **geom, bias=True, method="inst")


def _geom(n, k, groups, stride=1, padding=1):
    return dict(kernel_size=(k,) * n, stride=(stride,) * n, padding=(padding,) * n, dilation=(1,) * n, groups=groups)


@pytest.mark.parametrize("method", ["ghost", "inst"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", ["2d groups=2 stride 2", "1d T=70"])
def test_conv_natural_data_tight(case, dtype, method):
    """The Linear kernels' bounds on the unfolded rows, summed over groups; a channels-last x."""
    gen = torch.Generator().manual_seed(11)
    if case.startswith("2d"):
        geom = _geom(2, 3, 2, stride=2)
        x = torch.randn(2, 9, 9, 4, generator=gen).permute(0, 3, 1, 2)  # channels-last strides
        g = torch.randn(2, 6, 5, 5, generator=gen)
    else:
        geom = _geom(1, 3, 1)
        x, g = torch.randn(2, 3, 70, generator=gen), torch.randn(2, 5, 70, generator=gen)
    x, g = x.to(DEVICE, dtype), g.to(DEVICE, dtype)
    ew, eb = _exact_conv(x, g, geom)
    w, b = tt.conv_norms_bound(x, g, **geom, bias=True, method=method)
    _holds(w, ew, f"conv weight {case}")
    _holds(b, eb, f"conv bias {case}")
    # as the Linear bounds (test_natural_data_tight): measured <= 5e-5 here
    assert (w.certified().cpu() / ew - 1).max().item() <= 1e-3
    assert (b.certified().cpu() / eb - 1).max().item() <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["cancel", "huge", "tiny", "subnormal"])
def test_conv_adversarial_data(kind, dtype):
    """cancel: a kernel-1 conv whose positions pair inputs a, a + delta with gradients w, -w (the float32
    ghost value cancels); huge / tiny: 1e18 / 1e-30 inputs; subnormal: bf16 subnormal x and g."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, 40, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 40, generator=gen, dtype=torch.float64)
    geom = _geom(1, 3, 1)
    if kind == "cancel":
        geom = _geom(1, 1, 1, padding=0)
        x[:, :, 1::2] = 1e3 * (x[:, :, 0::2] + 1e-6 * x[:, :, 1::2])
        x[:, :, 0::2] *= 1e3
        g[:, :, 1::2] = -g[:, :, 0::2]
    elif kind == "subnormal":
        if dtype != torch.bfloat16:
            pytest.skip("bf16 subnormals")
        x = torch.where(x < 0, -1.0, 1.0) * (torch.rand(x.shape, generator=gen, dtype=torch.float64) + 0.5) * 1e-40
        g = torch.where(g < 0, -1.0, 1.0) * (torch.rand(g.shape, generator=gen, dtype=torch.float64) + 0.5) * 1e-40
    else:
        x = x * {"huge": 1e18, "tiny": 1e-30}[kind]
    x, g = x.to(DEVICE, dtype), g.to(DEVICE, dtype)
    assert bool((x != 0).all()) and bool((g != 0).all())
    ew, eb = _exact_conv(x, g, geom)
    for method in ("ghost", "inst"):
        w, b = tt.conv_norms_bound(x, g, **geom, bias=True, method=method)
        _holds(w, ew, f"conv {kind} {method}")
        _holds(b, eb, f"conv bias {kind}")
        assert bool(torch.isfinite(w.certified()).all())


def test_conv_certified_serves_the_kernel_bounds(monkeypatch):
    """dpkernels.ops.certified serves the Triton Linear bound kernels on the conv's rows, not the generic
    certificate; float64 inputs go to the reference's bound."""
    from dpkernels.ops.triton._common import observe_launches

    gen = torch.Generator().manual_seed(13)
    x, g = torch.randn(2, 4, 6, 6, generator=gen).to(DEVICE), torch.randn(2, 4, 6, 6, generator=gen).to(DEVICE)
    geom = _geom(2, 3, 2)
    own, _ = certified._own("conv_norms", "triton", x, g, **geom, bias=True, method="ghost")
    assert own is tt.conv_norms_bound
    monkeypatch.setattr(certified, "generic_bound", lambda *a, **k: pytest.fail("generic certificate used"))
    with observe_launches() as seen:
        w, b = certified.conv_norms(x, g, **geom, bias=True, method="ghost", backend="triton")
    names = [s.kernel.__name__ for s in seen]
    assert names == ["_token_norms_kernel", "_ghost_bound_kernel", "_sum_bound_kernel"], names
    ew, eb = _exact_conv(x, g, geom)
    assert bool((w.cpu() >= ew).all()) and bool((b.cpu() >= eb).all())
    w64, _ = tt.conv_norms_bound(x.double(), g.double(), **geom, bias=False, method="inst")
    r64, _ = ops.reference.conv_norms_bound(x.double(), g.double(), **geom, bias=False, method="inst")
    assert torch.equal(w64.certified(), r64.certified())
