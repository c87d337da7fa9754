"""Triton Embedding ops vs naive per-sample gradients and the reference, under TRITON_INTERPRET=1.

Shapes cross the kernels' blocks: T = 70 > 32 sorted tokens per scan step with V = 3, so runs of
equal ids span tiles (the carry) and the padding run sits between others; D = 70 > 64 gives two
D-tiles; V = 37 > 32 two row blocks of the clipped sum; B = 0, B = 1 and T = 1 are included.
Every norms case runs both norms kernels ("gram" where T <= 64).
"""

from __future__ import annotations

import importlib
import math

import _naive as naive
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _device import DEVICE

import dpkernels
from dpkernels import ops
from dpkernels.ops import reference as ref

tt = pytest.importorskip("dpkernels.ops.triton")
temb = importlib.import_module("dpkernels.ops.triton.embedding")

# (B, T, V, D, padding_idx)
SHAPES = [
    (0, 3, 5, 4, None),
    (1, 1, 4, 3, 0),
    (3, 5, 7, 9, 2),
    (2, 70, 3, 70, -1),  # runs of ~23 equal ids over 32-token scan tiles; padding id 2
    (1, 70, 1, 5, None),  # one run over all three scan tiles
    (2, 33, 37, 6, None),
]


def _methods(T):
    return ["gram", "scan"] if T <= temb.GRAM_MAX_T else ["scan"]


def _case(B, T, V, D, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen, device="cpu").to(DEVICE)
    if T > 1:
        ids[:, -1] = ids[:, 0]  # at least one repeated token per sample
    g = torch.randn(B, T, D, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE, dtype)
    c = torch.rand(B, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE, dtype)
    return ids, g, c


def _snr_db(x, ref_x):
    err = (x.double() - ref_x.double()).square().sum()
    return (10 * torch.log10(ref_x.double().square().sum() / err)).item() if err > 0 else float("inf")


# fp64: each norm or table entry is a sum of at most T + D <= 140 products of O(1) values, so rounding
# is below ~140 * 1.1e-16 ~ 2e-14 relative; rtol 1e-10 leaves a wide margin, while a repeated token
# counted once, the padding row counted or a lost carry changes results at O(1).
FP64 = dict(rtol=1e-10, atol=1e-10)
# fp32 against float64 truth: the same <= 140-term sums with eps = 6e-8 give <= 8e-6 worst case
# (sums of squares) and ~sqrt(140) eps ~ 7e-7 typical; rtol 1e-4 keeps a 10x margin over the worst case.
FP32 = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_norms_fp64_match_naive(shape):
    B, T, V, D, pad = shape
    ids, g, _ = _case(B, T, V, D)
    expected = naive.embedding(ids, g, V, pad).flatten(1).square().sum(1)
    for method in _methods(T):
        n = temb.launch_norms(ids, g, V, pad, method)
        assert n.dtype == torch.float64 and n.shape == (B,)
        torch.testing.assert_close(n, expected, **FP64)
    torch.testing.assert_close(tt.embedding_norms(ids, g, num_embeddings=V, padding_idx=pad), expected, **FP64)


@pytest.mark.parametrize("T", [5, 70])
def test_transposed_ids(T):
    """A sequence-first batch made batch-first by a transpose (ids (T, B).T, g (T, B, D).transpose(0, 1)):
    every kernel follows the strides. The scan kernel (T > 64) once read the sorted ids (which keep the
    input's strides) as contiguous, mixing the samples' tokens (norms off by up to 8x here)."""
    B, V, D = 3, 5, 8
    ids_tb, g_tb, c = _case(T, B, V, D)  # (T, B) ids and (T, B, D) rows, then viewed batch-first
    ids, g, c = ids_tb.T, g_tb.transpose(0, 1), c[:B]
    assert not ids.is_contiguous() and not g.is_contiguous()
    expected = naive.embedding(ids, g, V, 1).flatten(1).square().sum(1)
    for method in _methods(T):
        torch.testing.assert_close(temb.launch_norms(ids, g, V, 1, method), expected, **FP64)
    out = tt.embedding_clipped_sum(ids, g, c, num_embeddings=V, padding_idx=1)
    torch.testing.assert_close(out, (c[:, None, None] * naive.embedding(ids, g, V, 1)).sum(0), **FP64)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, B, D, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE).transpose(0, 1)
    gh = torch.randn(4, B, V, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE).transpose(0, 1)
    expected = (naive.embedding(ids, g, V, 1) * torch.einsum("bsv,bsd->bvd", gh, a)).sum(dim=(1, 2))
    torch.testing.assert_close(tt.embedding_linear_cross(ids, g, a, gh, padding_idx=1), expected, **FP64)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]])
def test_norms_fp32_and_int32_ids(shape):
    B, T, V, D, pad = shape
    ids, g, _ = _case(B, T, V, D, torch.float32)
    expected = naive.embedding(ids, g, V, pad).flatten(1).square().sum(1)
    for method in _methods(T):
        n = temb.launch_norms(ids.int(), g, V, pad, method)
        assert n.dtype == torch.float32
        torch.testing.assert_close(n.double(), expected, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norms_half(dtype):
    # 16-bit inputs are exact in fp32 and so are their products; with fp32 accumulation the norms are
    # as accurate as fp32 ones (> 100 dB). 60 dB still fails a kernel that rounds run sums or Gram tiles
    # to 16 bits (~50 dB for bf16).
    ids, g, _ = _case(2, 40, 5, 20, dtype)
    expected = naive.embedding(ids, g, 5, 1).flatten(1).square().sum(1)
    for method in ("gram", "scan"):
        n = temb.launch_norms(ids, g, 5, 1, method)
        assert n.dtype == torch.float32
        assert _snr_db(n, expected) > 60


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's NaN matmul, on purpose
@pytest.mark.parametrize("method", ["gram", "scan"])
def test_norms_non_finite(method):
    """A non-finite gradient at a padding position is ignored (as torch ignores it); anywhere else the
    norm turns non-finite, so the engine refuses the step instead of clipping a wrong norm."""
    ids = torch.tensor([[1, 0, 2, 0], [3, 3, 1, 2]])
    g = torch.randn(2, 4, 3, dtype=torch.float64)
    g[0, 1, 0] = float("nan")  # a padding token
    g[1, 2, 1] = float("inf")
    n = temb.launch_norms(ids, g, 4, 0, method)
    clean = g.clone()
    clean[0, 1] = 0
    torch.testing.assert_close(n[0], naive.embedding(ids[:1], clean[:1], 4, 0).square().sum(), **FP64)
    assert not torch.isfinite(n[1])


@pytest.mark.parametrize("shape", SHAPES)
def test_clipped_sum_fp64_matches_naive(shape):
    B, T, V, D, pad = shape
    ids, g, c = _case(B, T, V, D)
    prev = torch.randn(V, D, dtype=torch.float64)
    expected = 0.25 * (prev + (c[:, None, None] * naive.embedding(ids, g, V, pad)).sum(0))
    out = tt.embedding_clipped_sum(ids, g, c, num_embeddings=V, padding_idx=pad, scale=0.25, prev=prev)
    assert out.dtype == torch.float64 and out.shape == (V, D)
    torch.testing.assert_close(out, expected, **FP64)
    out = tt.embedding_clipped_sum(ids.int(), g, c, num_embeddings=V, padding_idx=pad)  # int32 ids, no prev
    torch.testing.assert_close(out, (c[:, None, None] * naive.embedding(ids, g, V, pad)).sum(0), **FP64)


@pytest.mark.parametrize("dtype, min_db", [(torch.float32, 120), (torch.bfloat16, 90), (torch.float16, 90)])
def test_clipped_sum_low_precision(dtype, min_db):
    # c_i g_it is formed and summed in fp32 (never rounded to 16 bits), so every dtype is as accurate as
    # fp32 rows: relative error ~ sqrt(#terms) * 6e-8, SNR ~ 140 dB. The bars keep >= 20 dB of margin
    # and fail a 16-bit rounding of c_i g_it (bf16: ~59 dB) or a dropped token (<< 60 dB).
    ids, g, c = _case(3, 40, 37, 20, dtype)
    expected = (c.double()[:, None, None] * naive.embedding(ids, g, 37, 5)).sum(0)
    out = tt.embedding_clipped_sum(ids, g, c, num_embeddings=37, padding_idx=5)
    assert out.dtype == torch.float32
    assert _snr_db(out, expected) > min_db


# ----------------------------------------------------------------------------- noise

Z = 4.5  # sigma bound of the statistical checks: a correct N(0, 1) exceeds it with probability 7e-6


def test_noise_dense_over_the_table():
    """Every row gets noise_std * z with z the shared Philox stream of the (V, D) table (the one
    add_noise gives for this seed and shape), touched rows, untouched rows and the padding row alike;
    its empirical std on the rows no sample touched is scale * noise_std."""
    V, D, pad = 300, 48, 7
    ids = torch.tensor([[7, 3, 3, 250], [0, 7, 7, 1]])
    g = torch.randn(2, 4, D, dtype=torch.float32)
    c = torch.tensor([0.5, 2.0])
    kw = dict(num_embeddings=V, padding_idx=pad)
    clean = tt.embedding_clipped_sum(ids, g, c, **kw, scale=0.5)
    noisy = tt.embedding_clipped_sum(ids, g, c, **kw, noise_std=3.0, scale=0.5, seed=1234)
    z = tt.add_noise(None, (V, D), noise_std=3.0, scale=0.5, seed=1234, device=DEVICE)
    # fp32: clean + z differs from the fused result by two roundings of O(1) values
    torch.testing.assert_close(noisy, clean + z, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[ids.flatten()] = False
    untouched[pad] = True  # the padding row gets noise, no data
    assert torch.equal(clean[pad], torch.zeros(D))
    noise = noisy[untouched].double().flatten()
    n = noise.numel()
    assert abs(noise.mean().item()) < Z * 1.5 / math.sqrt(n)
    assert abs(noise.std().item() / 1.5 - 1) < Z * math.sqrt(1 / (2 * n))  # std of a sample std: sigma/sqrt(2n)
    assert (noisy[untouched] != 0).all()


def test_noise_deterministic_and_seeded():
    ids, g, c = _case(2, 5, 20, 16, torch.float32)
    kw = dict(num_embeddings=20, padding_idx=None, noise_std=1.0)
    a = tt.embedding_clipped_sum(ids, g, c, **kw, seed=5)
    torch.testing.assert_close(a, tt.embedding_clipped_sum(ids, g, c, **kw, seed=5), rtol=0, atol=0)
    assert not torch.equal(a, tt.embedding_clipped_sum(ids, g, c, **kw, seed=6))
    empty = tt.embedding_clipped_sum(ids[:0], g[:0], c[:0], **kw, seed=5)  # B = 0: noise only
    torch.testing.assert_close(empty, tt.add_noise(None, (20, 16), noise_std=1.0, scale=1.0, seed=5, device=DEVICE))


# ----------------------------------------------------------------------------- cross term


@pytest.mark.parametrize(
    "B, Te, Th, V, D, pad", [(0, 3, 2, 5, 4, None), (1, 1, 1, 4, 3, 0), (3, 5, 4, 7, 9, -2), (2, 70, 3, 6, 20, 1)]
)
def test_cross_fp64_matches_naive(B, Te, Th, V, D, pad):
    ids, ge, _ = _case(B, Te, V, D)
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(B, Th, D, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE)
    gh = torch.randn(B, Th, V, generator=gen, dtype=torch.float64, device="cpu").to(DEVICE)
    dE = naive.embedding(ids, ge, V, pad)
    dH = torch.einsum("bsv,bsd->bvd", gh, a)  # the head's per-sample weight gradient G_i^T A_i
    expected = (dE * dH).sum(dim=(1, 2))
    out = tt.embedding_linear_cross(ids, ge, a, gh, padding_idx=pad)
    assert out.dtype == torch.float64 and out.shape == (B,)
    torch.testing.assert_close(out, expected, **FP64)
    if B:
        out32 = tt.embedding_linear_cross(ids, ge.float(), a.float(), gh.float(), padding_idx=pad)
        torch.testing.assert_close(out32.double(), expected, **FP32)


# ----------------------------------------------------------------------------- dispatch, errors, library


def test_dispatcher_serves_triton():
    ids, g, c = _case(2, 6, 9, 5)
    dpkernels.set_backend("triton")
    n = ops.embedding_norms(ids, g, num_embeddings=9, padding_idx=3)
    assert ops.last_backend["embedding_norms"] == "triton"
    torch.testing.assert_close(n, ref.embedding_norms(ids, g, num_embeddings=9, padding_idx=3), **FP64)
    s = ops.embedding_clipped_sum(ids, g, c, num_embeddings=9, padding_idx=3, scale=0.5)
    assert ops.last_backend["embedding_clipped_sum"] == "triton"
    torch.testing.assert_close(
        s, ref.embedding_clipped_sum(ids, g, c, num_embeddings=9, padding_idx=3, scale=0.5), **FP64
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs_name_the_op_and_argument(backend):
    """The dispatcher checks the inputs before any backend (ops._validate): the same errors on both."""
    ids, g, c = _case(2, 3, 5, 4, torch.float32)
    kw = dict(num_embeddings=5, padding_idx=None, backend=backend)
    with pytest.raises(TypeError, match="embedding_norms: ids must be a int32 or int64 tensor"):
        ops.embedding_norms(ids.float(), g, **kw)
    with pytest.raises(TypeError, match="embedding_norms: ids must be a int32 or int64 tensor, got torch.int16"):
        ops.embedding_norms(ids.to(torch.int16), g, **kw)
    with pytest.raises(IndexError, match=r"embedding_norms: ids must lie in \[0, 5\)"):
        ops.embedding_norms(ids + 5, g, **kw)
    with pytest.raises(IndexError, match="embedding_clipped_sum: ids must lie in"):
        ops.embedding_clipped_sum(ids - 5, g, c, **kw)
    with pytest.raises(ValueError, match="embedding_norms: g must be"):
        ops.embedding_norms(ids, g[:1], **kw)
    with pytest.raises(ValueError, match="embedding_norms: padding_idx"):
        ops.embedding_norms(ids, g, **{**kw, "padding_idx": 5})
    with pytest.raises(ValueError, match="embedding_clipped_sum: c must"):
        ops.embedding_clipped_sum(ids, g, c[:1], **kw)
    with pytest.raises(ValueError, match="prev must have"):
        ops.embedding_clipped_sum(ids, g, c, prev=torch.zeros(4, 4), **kw)
    with pytest.raises(ValueError, match="prev must have"):  # broadcasts to (5, 4), but is not its shape
        ops.embedding_clipped_sum(ids, g, c, prev=torch.zeros(1, 4), **kw)
    with pytest.raises(ValueError, match="embedding_linear_cross: g_h must be"):
        ops.embedding_linear_cross(ids, g, g, g[:, :2], padding_idx=None, backend=backend)
    with pytest.raises(TypeError, match="embedding_norms: g must be a float16"):
        ops.embedding_norms(ids, g.int(), **kw)


def test_gram_kernel_holds_64_positions():
    with pytest.raises(ValueError, match="embedding_norms: the gram kernel"):
        temb.launch_norms(torch.zeros(1, 65, dtype=torch.long), torch.zeros(1, 65, 2), 3, None, "gram")


def _op_cases():
    ids, g, c = _case(2, 5, 7, 6, torch.float32)
    prev = torch.randn(7, 6)
    a, gh = torch.randn(2, 3, 6), torch.randn(2, 3, 7)
    d = torch.ops.dpkernels
    return [
        (d.triton_embedding_norms.default, (ids, g, 7, 2)),
        (d.triton_embedding_norms.default, (ids, g, 7, None)),
        (d.triton_embedding_clipped_sum.default, (ids, g, c, 7, 2, 0.5, 0.25, 3, prev)),
        (d.triton_embedding_clipped_sum.default, (ids, g, c, 7, None, 0.0, 1.0, 0, None)),
        (d.triton_embedding_linear_cross.default, (ids, g, a, gh, 1)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    """A function calling the three ops through the dispatcher compiles without graph breaks and gives
    the eager results (noise included: a function of the seed)."""
    ids, g, c = _case(3, 6, 11, 5, torch.float32)
    a, gh = torch.randn(3, 4, 5), torch.randn(3, 4, 11)
    prev = torch.randn(11, 5)

    def step(ids, g, c, a, gh, prev):
        n = ops.embedding_norms(ids, g, num_embeddings=11, padding_idx=0, backend="triton")
        x = ops.embedding_linear_cross(ids, g, a, gh, padding_idx=0, backend="triton")
        s = ops.embedding_clipped_sum(
            ids, g, c, num_embeddings=11, padding_idx=0, noise_std=0.5, scale=0.1, seed=9, prev=prev, backend="triton"
        )
        return n + 2 * x, s

    eager = step(ids, g, c, a, gh, prev)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(ids, g, c, a, gh, prev)
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # the same kernels on the same inputs


# ----------------------------------------------------------------------------- end to end


class _Model(nn.Module):
    """Embedding -> LayerNorm -> Linear head; ``tied`` shares the table with the head (GPT-2's wte/lm_head)."""

    def __init__(self, V=13, D=6, tied=False):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)))


@pytest.mark.parametrize("tied, loss_reduction", [(False, "mean"), (True, "sum")])
def test_make_private_step_matches_reference(tied, loss_reduction):
    """One noiseless DP-SGD step of Embedding + LayerNorm + Linear gives the same gradients with the
    triton backend as with the reference (tied: the embedding_linear_cross term is exercised too)."""

    def run(backend):
        torch.manual_seed(0)
        model = _Model(tied=tied).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = dpkernels.make_private(
            model,
            opt,
            noise_multiplier=0.0,
            max_grad_norm=0.3,
            expected_batch_size=4.0,
            loss_reduction=loss_reduction,
            backend=backend,
        )
        ids = torch.randint(0, 13, (5, 7))
        ids[:, 3] = 0  # padding tokens
        ids[:, 5] = ids[:, 1]  # repeated tokens
        y = torch.randint(0, 13, (5, 7))
        loss = F.cross_entropy(model(ids).transpose(1, 2), y, reduction="none").sum(1)
        (loss.mean() if loss_reduction == "mean" else loss.sum()).backward()
        opt.step()
        served = dict(ops.last_backend)
        dpkernels.set_backend(None)
        return [p.grad.clone() for p in model.parameters()], served

    g_ref, _ = run("reference")
    g_tri, served = run("triton")
    names = ["embedding_norms", "embedding_clipped_sum", "affine_norms", "affine_clipped_sum"]
    names += ["embedding_linear_cross"] if tied else []
    assert all(served[n] == "triton" for n in names), served
    assert all(g.abs().sum() > 0 for g in g_ref)  # a real step, not all-zero gradients
    for x, y in zip(g_tri, g_ref):
        torch.testing.assert_close(x, y, **FP64)
