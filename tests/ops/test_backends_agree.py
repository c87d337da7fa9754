"""Differential test of the backends: every op of dpkernels.ops, run by the Triton backend (under
TRITON_INTERPRET=1) or the compiled one (csrc/, its CPU build: the same functors its CUDA kernels run)
and by the reference on the same random inputs, gives the same answer within a stated rounding bound,
and both accept and refuse the same inputs. The compiled Linear and Conv clipped sums are checked on both
of their paths (the ATen matmul / convolution the CPU uses and the tile kernel CUDA uses, split and
unsplit).

Inputs (hypothesis, derandomized so that CI is deterministic): random shapes (odd sizes, B = 0 and 1,
T = 1, long T > 64), layouts (contiguous, transposed / every stride reversed, strided views,
expanded stride-0 dims, channels_last convs), dtypes (float32, float64, bfloat16, float16) and
magnitudes (a power of ten per tensor and another per sample, up to 1e30 where the dtype's range
allows; see `_exponent`).

The bound. Every op computes sums of products of its inputs in an accumulation dtype of unit
roundoff u (2^-24 for float32, bfloat16 and float16 inputs, 2^-53 for float64), in some order. A
sum of n rounded products differs from the exact value by at most gamma_n * M with
gamma_n = n u / (1 - n u) and M the same computation on the absolute values of the inputs (for a
norm ||G^T A||^2: ||(|G|^T |A|)||^2, which bounds every term of both the ghost and the instantiated
formula; Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 3.1). Two
backends each within that bound differ by at most 2 gamma_n M, elementwise, whatever cancels. M is
computed by the reference op in float64 on |inputs|; n is a count of the roundings on the longest
path, per op (`_terms`). The clipped sums of 16-bit inputs add one rounding of c_i g_it to the
16-bit operand of a tensor-core dot (one ulp: 2^-7 relative for bfloat16, 2^-10 for float16), and for float16
the block scale's floor (2^-38 times the largest |c_i g_it|, times sum_k |a_k|: see
dpkernels.ops.triton._common.fp16_block_scale). The compiled backend multiplies in the accumulation
dtype (c_i g_it rounded once to fp32, which the count n holds) and gets no extra term.

Noise: the backends draw z from counter-based generators keyed by the seed, but not the same ones
(the reference torch.Generator's Philox stream, the Triton kernels and the compiled backend tl.randn's
Philox keyed by the element's offset), so the numbers differ for the same seed: `test_noise_statistics_agree` compares
the noise of every op by its mean and standard deviation instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from dpkernels import ops
from dpkernels.ops import reference as ref

pytest.importorskip("dpkernels.ops.triton")

BACKENDS = ["triton", "cuda"]  # each against the reference


def _available(name: str) -> str:
    """``name``, after skipping the test where that backend cannot be loaded (the compiled one cannot be
    built everywhere; where CI requires it, DPKERNELS_REQUIRE_COMPILED=1, its absence is an error)."""
    if name not in ops.available_backends():
        if name == "cuda" and os.environ.get("DPKERNELS_REQUIRE_COMPILED"):
            pytest.fail(f"the compiled backend is required but unavailable: {ops._errors.get(name)}")
        pytest.skip(f"backend {name} unavailable here: {ops._errors.get(name)}")
    return name


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    """A backend under test."""
    return _available(request.param)


FAST = settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(FAST, max_examples=60)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}  # unit roundoff of the accumulation dtype
# c_i g_it rounded to a 16-bit dot operand: one ulp of 8 (bf16) and 11 (fp16) significant bits, which
# bounds round-to-nearest (the GPU's) and the truncation of Triton's interpreter (its fp32 -> bf16 cast)
OPERAND = {
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}  # unit roundoffs (8 and 11 significant bits)  # c_i g_it rounded to a 16-bit dot operand
FP16_FLOOR = 2.0**-38  # fp16_block_scale: the absolute floor, relative to the largest |c_i g_it|


@pytest.fixture(autouse=True)
def _ieee_fp32():
    # The bound assumes IEEE float32 dots, which the kernels use while torch's float32 matmul
    # precision is "highest" (the default; see triton._common.dot_precision).
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


# ----------------------------------------------------------------------------- inputs


def _exponent(dtype: torch.dtype, degree: int, extra: int = 0) -> int:
    """The largest |power of ten| of an input's scale: inputs within the dtype's range (float16:
    10^3, its normal range being 6e-5..65504; others up to 10^30), and a result of ``degree`` such
    inputs (times ``extra`` more powers of ten, the clip factors') within 80% of the accumulation
    dtype's exponent range on both sides, the rest left for the sums' lengths (<= 10^7 terms)."""
    if dtype == torch.float16:
        return 3
    top = 308 if dtype == torch.float64 else 38
    return min(30, int((0.8 * top - extra) / degree))


@dataclass
class Gen:
    """Tensors drawn from a torch.Generator keyed by a hypothesis-drawn seed, with drawn scales and layouts."""

    data: st.DataObject
    dtype: torch.dtype
    degree: int
    extra: int = 0
    gen: torch.Generator = field(init=False)

    def __post_init__(self):
        self.gen = torch.Generator().manual_seed(self.data.draw(st.integers(0, 2**31 - 1), label="seed"))
        self.emax = _exponent(self.dtype, self.degree, self.extra)

    def randn(self, *shape: int, layout: bool = True, per_sample: bool = True) -> torch.Tensor:
        """randn * 10^e (one e per tensor) * 10^(e_i) (one per sample, mixed magnitudes), in dtype."""
        spread = min(2, self.emax // 2) if per_sample else 0
        e = self.data.draw(st.integers(-(self.emax - spread), self.emax - spread), label="exponent")
        x = torch.randn(*shape, generator=self.gen, dtype=torch.float64) * 10.0**e
        if spread and shape and shape[0]:
            e_i = torch.randint(-spread, spread + 1, (shape[0],), generator=self.gen).double()
            x = x * (10.0**e_i).view(-1, *[1] * (len(shape) - 1))
        x = x.to(self.dtype)
        return self.layout(x) if layout else x

    def layout(self, x: torch.Tensor, expand_dim: int | None = 1) -> torch.Tensor:
        """The same values (or, "expanded", those of index 0 along ``expand_dim``) in another layout."""
        kinds = ["contiguous", "reversed", "strided"]
        if expand_dim is not None and x.dim() > expand_dim and x.shape[expand_dim] > 0:
            kinds.append("expanded")
        kind = self.data.draw(st.sampled_from(kinds), label="layout")
        if kind == "reversed":  # every stride reversed: a transposed (T, B, d) batch, channels_last-like
            rev = list(range(x.dim()))[::-1]
            return x.permute(rev).contiguous().permute(rev)
        if kind == "strided" and x.dim():
            buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
            buf[..., ::2] = x
            return buf[..., ::2]
        if kind == "expanded":
            return x.narrow(expand_dim, 0, 1).expand(x.shape)
        return x

    def clip(self, B: int) -> torch.Tensor:
        """Clip factors in [0, 1] * 10^e, e in [-8, 3] (automatic clipping's exceed 1), float32 (float64)."""
        e = self.data.draw(st.integers(-8, 3), label="c exponent")
        dt = torch.float64 if self.dtype == torch.float64 else torch.float32
        return torch.rand(B, generator=self.gen, dtype=torch.float64).to(dt) * 10.0**e

    def epilogue(self, shapes: dict[str, tuple[int, ...]]) -> dict:
        """scale, and a ``prev`` of exactly each output's shape (or None); no noise (see the noise test)."""
        kw: dict = {"scale": self.data.draw(st.sampled_from([1.0, 0.25, 1 / 3]), label="scale")}
        for name, shape in shapes.items():
            if self.data.draw(st.booleans(), label=name):
                kw[name] = (
                    self.randn(*shape, per_sample=False)
                    .float()
                    .to(torch.float64 if self.dtype == torch.float64 else torch.float32)
                )
        return kw


def _sizes(data: st.DataObject, long: bool = True) -> tuple[int, int]:
    B = data.draw(st.sampled_from([0, 1, 2, 3]), label="B")
    T = data.draw(st.sampled_from([1, 2, 5, 70] if long else [1, 2, 5]), label="T")
    return B, T


def _dim(data: st.DataObject, label: str) -> int:
    return data.draw(st.sampled_from([1, 3, 7, 17, 33]), label=label)


# ----------------------------------------------------------------------------- the comparison


def _abs(v):
    return v.abs().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _terms(op: str, args: tuple, kw: dict) -> int:
    """Roundings on the longest path of ``op``'s computation (a generous count: every product, every
    addition of the longest sum, the clip factor's product, prev, scale)."""
    if op in ("linear_norms", "conv_norms"):
        a, g = args[0], args[1]
        if op == "conv_norms":  # per group: T output positions, d <= C_in prod(k), p <= C_out; groups summed
            T, d, p = math.prod(g.shape[2:]), a.shape[1] * math.prod(kw["kernel_size"]), g.shape[1]
        else:
            T, d, p = a.shape[1], a.shape[2], g.shape[2]
        return T * T + T + d + p + d * p + 8  # ghost: d, 1, T^2; inst: T, 1, d p; partial sums; groups
    if op in ("bias_norms", "embedding_norms", "affine_norms"):  # a T-sum (twice: the scan's carry), square, C-sum
        g = args[0] if op == "bias_norms" else args[1]
        return 2 * g.shape[1] + g.shape[2] + 4
    if op == "embedding_linear_cross":  # a D-sum, a product, the Te x Th sum
        ids, g_e, a = args[0], args[1], args[2]
        return ids.shape[1] * a.shape[1] + g_e.shape[2] + 4
    # clipped sums: c_i g_it, a sum over the B*T rows (conv: output positions), split-K parts (<= rows), prev, scale
    g = args[0] if op == "bias_clipped_sum" else args[1]
    rows = g.shape[0] * math.prod(g.shape[2:]) if op == "conv_clipped_sum" else g.shape[0] * g.shape[1]
    return 2 * rows + 5


def _floor16(op: str, args: tuple, kw: dict, out_shape) -> torch.Tensor | float:
    """float16 clipped sums of Linear and Conv: FP16_FLOOR * max |c_i g_it| * sum_k |a_kd| per output."""
    a, g, c = args[0], args[1], args[2]
    cg_max = (g.double().abs() * c.double().abs().view(-1, *[1] * (g.dim() - 1))).max() if g.numel() else 0.0
    ones_g = torch.ones_like(g, dtype=torch.float64)
    ones_c = torch.ones_like(c, dtype=torch.float64)
    akw = {k: v for k, v in kw.items() if k not in ("prev_w", "prev_b", "scale")}
    w, _ = getattr(ref, op)(a.double().abs(), ones_g, ones_c, **akw)
    return FP16_FLOOR * cg_max * w * abs(kw.get("scale", 1.0))


def _tiles(op: str, args: tuple, kw: dict, splits: int):
    """The compiled Linear or Conv clipped sum on its tile path (CUDA's, path=1) with ``splits`` forced
    (0: automatic)."""
    epi = (0.0, kw["scale"], 0, 0, kw.get("prev_w"), kw.get("prev_b"), 1, splits)
    if op == "linear_clipped_sum":
        w, b = torch.ops.dpkernels.cuda_linear_clipped_sum(*args, kw["bias"], *epi)
    else:
        geo = [[v] if isinstance(v, int) else list(v) for v in (kw["stride"], kw["padding"], kw["dilation"])]
        w, b = torch.ops.dpkernels.cuda_conv_clipped_sum(
            *args, list(kw["weight_shape"]), *geo, kw["groups"], kw["bias"], *epi
        )
    return w, (b if kw["bias"] else None)


def _compare(op: str, args: tuple, kw: dict, backend: str) -> None:
    """The backend's results on (args, kw) and the reference's, within 2 gamma_n M (+ the 16-bit operand terms)."""
    out_t = getattr(ops, op)(*args, **kw, backend=backend)
    assert ops.last_backend[op] == backend
    if backend == "cuda" and op in ("linear_clipped_sum", "conv_clipped_sum"):
        # and CUDA's path (the tiles), split and unsplit, on the same (valid: checked above) inputs
        for splits in (0, 3):
            _check(op, args, kw, backend, _tiles(op, args, kw, splits))
    _check(op, args, kw, backend, out_t)


def _check(op: str, args: tuple, kw: dict, backend: str, out_t) -> None:
    out_r = getattr(ops, op)(*args, **kw, backend="reference")
    M = getattr(ref, op)(*[_abs(v) for v in args], **{k: _abs(v) for k, v in kw.items()})
    tensors = [t for t in args if isinstance(t, torch.Tensor) and t.is_floating_point()]
    in_dt = [t.dtype for t in tensors]
    u = UNIT[ops.acc_dtype(*tensors)]
    n = _terms(op, args, kw)
    gamma = n * u / (1 - n * u)
    clipped = "clipped_sum" in op
    half = [d for d in in_dt if d in OPERAND]
    outs = lambda x: list(x) if isinstance(x, tuple) else [x]  # noqa: E731
    for i, (t, r, m) in enumerate(zip(outs(out_t), outs(out_r), outs(M), strict=True)):
        if r is None:
            assert t is None
            continue
        assert t.shape == r.shape and t.dtype == r.dtype, (op, i, t.shape, r.shape, t.dtype, r.dtype)
        bound = 2 * gamma * m
        is_weight = i == 0 and op in ("linear_clipped_sum", "conv_clipped_sum")
        if clipped and half and is_weight and backend == "triton":
            # the weight's tensor-core dot rounds c_i g_it to the 16-bit operand once (biases sum in fp32)
            bound = bound + max(OPERAND[d] for d in half) * m
            if torch.float16 in half:
                bound = bound + _floor16(op, args, kw, r.shape)
        err = (t.double() - r.double()).abs()
        assert torch.isfinite(r).all() and torch.isfinite(t).all(), (op, i)
        worst = (err - bound).max().item() if err.numel() else 0.0
        assert worst <= 0, f"{op} output {i}: |{backend} - reference| exceeds the bound by {worst:.3g} ({n = }, {u = })"


# ----------------------------------------------------------------------------- cases, one per op


def _linear(data, dtype, op):
    B, T = _sizes(data)
    d, p = _dim(data, "d"), _dim(data, "p")
    if op == "linear_norms":
        gen = Gen(data, dtype, degree=4)
        a, g = gen.randn(B, T, d), gen.randn(B, T, p)
        return (a, g), {"bias": data.draw(st.booleans()), "method": data.draw(st.sampled_from(["ghost", "inst"]))}
    if op == "bias_norms":
        return (Gen(data, dtype, degree=2).randn(B, T, p),), {}
    gen = Gen(data, dtype, degree=2, extra=3)
    g, c = gen.randn(B, T, p), gen.clip(B)
    if op == "bias_clipped_sum":
        kw = gen.epilogue({"prev": (p,)})
        return (g, c), kw
    a = gen.randn(B, T, d)
    bias = data.draw(st.booleans())
    return (a, g, c), {"bias": bias, **gen.epilogue({"prev_w": (p, d), **({"prev_b": (p,)} if bias else {})})}


def _conv(data, dtype, op):
    n = data.draw(st.sampled_from([1, 2, 3]), label="spatial dims")
    B = data.draw(st.sampled_from([0, 1, 2]), label="B")
    groups = data.draw(st.sampled_from([1, 2]), label="groups")
    cin, cout = groups * data.draw(st.sampled_from([1, 3])), groups * data.draw(st.sampled_from([1, 2, 5]))
    k = tuple(data.draw(st.sampled_from([1, 2, 3]), label="k") for _ in range(n))
    s = tuple(data.draw(st.sampled_from([1, 2]), label="stride") for _ in range(n))
    pad = tuple(data.draw(st.sampled_from([0, 1]), label="padding") for _ in range(n))
    dil = tuple(data.draw(st.sampled_from([1, 2]), label="dilation") for _ in range(n))
    long = n == 1 and data.draw(st.booleans(), label="long")  # 1-d: > 64 output positions
    base = [70] if long else [1, 3] if n == 3 else [1, 3, 4]  # output positions per dim (stride 1, no padding)
    S = tuple(data.draw(st.sampled_from(base), label="size") + dil[i] * (k[i] - 1) for i in range(n))
    out = tuple((S[i] + 2 * pad[i] - dil[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(n))
    gen = Gen(data, dtype, degree=4 if op == "conv_norms" else 2, extra=0 if op == "conv_norms" else 3)
    x = gen.layout(gen.randn(B, cin, *S, layout=False), expand_dim=None)  # channels_last: "reversed" on (B, C, *S)
    g = gen.layout(gen.randn(B, cout, *out, layout=False), expand_dim=None)
    if data.draw(st.booleans(), label="channels_last") and n in (2, 3):
        fmt = torch.channels_last if n == 2 else torch.channels_last_3d
        x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    geom = {"stride": s, "padding": pad, "dilation": dil, "groups": groups}
    bias = data.draw(st.booleans(), label="bias")
    if op == "conv_norms":
        return (x, g), {"kernel_size": k, **geom, "bias": bias, "method": data.draw(st.sampled_from(["ghost", "inst"]))}
    ws = (cout, cin // groups, *k)
    kw = gen.epilogue({"prev_w": ws, **({"prev_b": (cout,)} if bias else {})})
    return (x, g, gen.clip(B)), {"weight_shape": ws, **geom, "bias": bias, **kw}


def _ids(gen: Gen, data, B: int, T: int, V: int) -> torch.Tensor:
    ids = torch.randint(0, V, (B, T), generator=gen.gen)
    if T > 1 and B:
        ids[:, -1] = ids[:, 0]  # a repeated token per sample
    ids = ids.to(data.draw(st.sampled_from([torch.int64, torch.int32]), label="ids dtype"))
    return gen.layout(ids, expand_dim=0)  # expanded along the batch: (1, T) ids broadcast to (B, T)


def _embedding(data, dtype, op):
    B, T = _sizes(data)
    V, D = data.draw(st.sampled_from([1, 5, 37]), label="V"), _dim(data, "D")
    pad = data.draw(st.sampled_from([None, 0, -1, V // 2]), label="padding_idx")
    if op == "embedding_linear_cross":
        gen = Gen(data, dtype, degree=3)
        Th = data.draw(st.sampled_from([1, 4, 66]), label="Th")
        ids = _ids(gen, data, B, T, V)
        return (ids, gen.randn(B, T, D), gen.randn(B, Th, D), gen.randn(B, Th, V)), {"padding_idx": pad}
    gen = Gen(data, dtype, degree=2, extra=0 if op == "embedding_norms" else 3)
    ids, g = _ids(gen, data, B, T, V), gen.randn(B, T, D)
    kw = {"num_embeddings": V, "padding_idx": pad}
    if op == "embedding_norms":
        return (ids, g), kw
    return (ids, g, gen.clip(B)), {**kw, **gen.epilogue({"prev": (V, D)})}


def _affine(data, dtype, op):
    B, T = _sizes(data)
    C = _dim(data, "C")
    weight, bias = data.draw(st.sampled_from([(True, True), (True, False), (False, True)]), label="weight, bias")
    gen = Gen(data, dtype, degree=4 if op == "affine_norms" else 2, extra=0 if op == "affine_norms" else 3)
    xhat, g = gen.randn(B, T, C), gen.randn(B, T, C)
    if op == "affine_norms":
        return (xhat, g), {"weight": weight, "bias": bias}
    shapes = {**({"prev_w": (C,)} if weight else {}), **({"prev_b": (C,)} if bias else {})}
    return (xhat, g, gen.clip(B)), {"weight": weight, "bias": bias, **gen.epilogue(shapes)}


CASES = {
    "linear_norms": _linear,
    "linear_clipped_sum": _linear,
    "bias_norms": _linear,
    "bias_clipped_sum": _linear,
    "conv_norms": _conv,
    "conv_clipped_sum": _conv,
    "embedding_norms": _embedding,
    "embedding_clipped_sum": _embedding,
    "embedding_linear_cross": _embedding,
    "affine_norms": _affine,
    "affine_clipped_sum": _affine,
}


def test_every_op_is_covered():
    """Every op the dispatcher serves (add_noise: test_noise_statistics_agree) has a case here."""
    dispatched = {n for n in dir(ops) if (getattr(getattr(ops, n), "__doc__", None) or "").startswith("Dispatches to")}
    assert dispatched == set(CASES), dispatched ^ set(CASES)


def _agree(op: str, data: st.DataObject, backend: str) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    args, kw = CASES[op](data, dtype, op)
    _compare(op, args, kw, backend)


@pytest.mark.parametrize("op", list(CASES))
@FAST
@given(data=st.data())
def test_backends_agree(op, backend, data):
    _agree(op, data, backend)


@pytest.mark.slow
@pytest.mark.parametrize("op", list(CASES))
@SLOW
@given(data=st.data())
def test_backends_agree_many(op, backend, data):
    _agree(op, data, backend)


class Pinned:
    """A stand-in for hypothesis's data object: the draws whose label is given take that value (every
    draw of the label), the others the strategy's simplest value (what hypothesis shrinks towards)."""

    def __init__(self, **values):
        self.values = values

    def draw(self, strategy, label=None):
        if label in self.values:
            return self.values[label]
        return find(strategy, lambda _: True, settings=settings(database=None))


# Cases a few random draws may miss, pinned so that the default run always holds them. On the code
# before this test, the transposed ids failed embedding_norms (the clipped sum already followed the
# strides) and both float16 cases failed both ops.
HARD = {
    # a transposed (T, B) ids view with T > 64 (the embedding scan kernel read the sorted ids as contiguous)
    "transposed long ids": dict(dtype=torch.float32, B=3, T=70, V=5, layout="reversed", Th=4),
    # float16 c_i g_it past 65504 (c up to 1e3, |g| up to ~4e3): was inf
    "fp16 overflow": dict(dtype=torch.float16, B=3, T=5, exponent=2, **{"c exponent": 3}),
    # float16 c_i g_it below 6e-8 (c up to 1e-8): was flushed to 0
    "fp16 underflow": dict(dtype=torch.float16, B=3, T=5, exponent=0, **{"c exponent": -8}),
}
HARD_OPS = {
    "transposed long ids": ["embedding_norms", "embedding_clipped_sum"],
    "fp16 overflow": ["linear_clipped_sum", "conv_clipped_sum"],
    "fp16 underflow": ["linear_clipped_sum", "conv_clipped_sum"],
}


@pytest.mark.parametrize("case, op", [(case, op) for case, ops_ in HARD_OPS.items() for op in ops_])
def test_backends_agree_on_hard_cases(case, op, backend):
    _agree(op, Pinned(**HARD[case]), backend)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- refusals


def _outcome(fn) -> type | None:
    try:
        fn()
    except Exception as exc:  # the type is what is compared
        return type(exc)
    return None


def _mutations(op: str, args: tuple, kw: dict) -> dict:
    """Ways to break a valid call, each (args, kw)."""
    out = {}
    first = 1 if op.startswith("embedding") else 0
    x = args[first]
    out["integer input"] = (args[:first] + (x.to(torch.int32),) + args[first + 1 :], kw)
    out["extra dim"] = (args[:first] + (x[None],) + args[first + 1 :], kw)
    other = 1 if op != "bias_norms" and op != "bias_clipped_sum" and not op.startswith("embedding") else None
    if other is not None and len(args) > other:  # the batch of the second tensor off by one
        y = args[other]
        y = torch.cat([y, y[:1]]) if y.shape[0] else torch.zeros(1, *y.shape[1:], dtype=y.dtype)
        out["batch mismatch"] = (args[:other] + (y,) + args[other + 1 :], kw)
    if "clipped_sum" in op:
        ci = 2 if op != "bias_clipped_sum" else 1
        c = args[ci]
        out["c per element"] = (args[:ci] + (c[None],) + args[ci + 1 :], kw)
        out["negative noise_std"] = (args, {**kw, "noise_std": -1.0})
        out["NaN noise_std"] = (args, {**kw, "noise_std": float("nan")})
        for name in ("prev", "prev_w", "prev_b"):
            if kw.get(name) is not None and kw[name].dim() and kw[name].shape[0] > 1:
                out[f"{name} that only broadcasts"] = (args, {**kw, name: kw[name][:1]})
    if op.startswith("embedding"):
        ids = args[0]
        V = kw.get("num_embeddings") or args[3].shape[2]
        out["int16 ids"] = ((ids.to(torch.int16),) + args[1:], kw)
        out["ids past the table"] = ((ids + V,) + args[1:], kw)
        out["negative ids"] = ((ids - V,) + args[1:], kw)
        out["padding_idx past the table"] = (args, {**kw, "padding_idx": V})
    if "method" in kw:
        out["unknown method"] = (args, {**kw, "method": "fast"})
    return out


def _refuse(op: str, data: st.DataObject, backend: str) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    args, kw = CASES[op](data, dtype, op)
    muts = _mutations(op, args, kw)
    name = data.draw(st.sampled_from(sorted(muts)), label="mutation")
    bad_args, bad_kw = muts[name]
    t = _outcome(lambda: getattr(ops, op)(*bad_args, **bad_kw, backend=backend))
    r = _outcome(lambda: getattr(ops, op)(*bad_args, **bad_kw, backend="reference"))
    assert t is r, f"{op}, {name}: {backend} -> {t}, reference -> {r}"


@pytest.mark.parametrize("op", list(CASES))
@FAST
@given(data=st.data())
def test_backends_refuse_alike(op, backend, data):
    _refuse(op, data, backend)


@pytest.mark.slow
@pytest.mark.parametrize("op", list(CASES))
@SLOW
@given(data=st.data())
def test_backends_refuse_alike_many(op, backend, data):
    _refuse(op, data, backend)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_inputs_one_backend_accepted(backend):
    """Inputs one backend once accepted and the other refused, now refused by both with one error:
    a batch mismatch (the reference's ghost norm broadcast a 1-sample a against g), a prev that only
    broadcasts to the output (the reference added it to every row), ids past the table (the Triton
    clipped sum dropped them) and int16 ids (the reference's unique and index_add took them)."""
    _available(backend)
    a, g, c = torch.randn(1, 3, 4), torch.randn(2, 3, 5), torch.rand(2)
    with pytest.raises(ValueError, match=r"linear_norms: a must be \(B, T, d\) with g's \(B, T\) \(2, 3\)"):
        ops.linear_norms(a, g, bias=False, method="ghost", backend=backend)
    with pytest.raises(ValueError, match=r"linear_clipped_sum: prev_w must have the output's shape \(5, 4\)"):
        ops.linear_clipped_sum(a.expand(2, 3, 4), g, c, bias=False, prev_w=torch.zeros(1, 4), backend=backend)
    ids, ge = torch.tensor([[0, 3], [1, 5]]), torch.randn(2, 2, 3)
    with pytest.raises(IndexError, match=r"embedding_clipped_sum: ids must lie in \[0, 5\)"):
        ops.embedding_clipped_sum(ids, ge, c, num_embeddings=5, padding_idx=None, backend=backend)
    with pytest.raises(TypeError, match="embedding_norms: ids must be a int32 or int64 tensor, got torch.int16"):
        ops.embedding_norms(ids.clamp(max=4).to(torch.int16), ge, num_embeddings=5, padding_idx=None, backend=backend)


# ----------------------------------------------------------------------------- noise

Z = 4.5  # sigma bound of the statistical checks: a correct N(0, 1) statistic exceeds it with probability 7e-6


def _noise_cases():
    """Each op's call with ~500 noised elements in its outputs (the conv bias 32; see `_standard`)."""
    gen = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=gen)

    c = torch.rand(2, generator=gen)
    x, gx = r(2, 4, 5, 5), r(2, 32, 4, 4)
    ids = torch.randint(0, 32, (2, 5), generator=gen)
    return {
        "linear_clipped_sum": ((r(2, 3, 5), r(2, 3, 100), c), {"bias": True}),
        "bias_clipped_sum": ((r(2, 3, 500), c), {}),
        "conv_clipped_sum": (
            (x, gx, c),
            {"weight_shape": (32, 4, 2, 2), "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True},
        ),
        "embedding_clipped_sum": ((ids, r(2, 5, 16), c), {"num_embeddings": 32, "padding_idx": 0}),
        "affine_clipped_sum": ((r(2, 3, 500), r(2, 3, 500), c), {"weight": True, "bias": True}),
    }


def _standard(z: torch.Tensor, what: str) -> None:
    z = z.double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < Z / math.sqrt(n), f"{what}: noise mean {z.mean().item():.3g} over {n}"
    # the std of a sample std is ~ 1/sqrt(2n): the bar (0.14 at n = 500) rejects 0.67x and 1.5x the scale
    assert abs(z.std().item() - 1) < Z * math.sqrt(1 / (2 * n)), f"{what}: noise std {z.std().item():.3g} over {n}"


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("op", list(_noise_cases()) + ["add_noise"])
def test_noise_statistics_agree(op, backend):
    """Every op's noise is noise_std * z with z standard normal, on every output, in both backends (their
    streams differ for one seed: compared by mean and std), and a seed repeats its stream."""
    _available(backend)
    std, scale = 3.0, 0.5
    if op == "add_noise":
        prev = torch.randn(20, 25)

        def run(noise_std, seed):
            return (
                ops.add_noise(
                    prev, (20, 25), noise_std=noise_std, scale=scale, seed=seed, device="cpu", backend=backend
                ),
            )
    else:
        args, kw = _noise_cases()[op]
        seeds = ("seed",) if op in ("bias_clipped_sum", "embedding_clipped_sum") else ("seed_w", "seed_b")

        def run(noise_std, seed):
            s = {name: seed + i for i, name in enumerate(seeds)}
            out = getattr(ops, op)(*args, **kw, noise_std=noise_std, scale=scale, **s, backend=backend)
            return tuple(t for t in (out if isinstance(out, tuple) else (out,)) if t is not None)

    clean, noisy = run(0.0, 11), run(std, 11)
    assert ops.last_backend[op] == backend
    for i, (x, y) in enumerate(zip(clean, noisy, strict=True)):
        _standard((y - x) / (scale * std), f"{op} output {i} ({backend})")
    for x, y in zip(noisy, run(std, 11), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # the same seed, the same noise


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p, d", [(0, 3), (3, 0), (0, 0)])
def test_empty_feature_dims_agree(backend, p, d):
    """A Linear with no outputs or no inputs (p or d = 0): every backend returns the same (empty or
    noise-only) answer; the reference once failed to reshape its empty G."""
    _available(backend)
    g = torch.randn(2, 3, p, dtype=torch.float64)
    a = torch.randn(2, 3, d, dtype=torch.float64)
    c = torch.rand(2, dtype=torch.float64)
    want = ops.linear_clipped_sum(a, g, c, bias=True, backend="reference")
    got = ops.linear_clipped_sum(a, g, c, bias=True, backend=backend)
    for x, y in zip(got, want, strict=True):
        assert x is not None and y is not None and x.shape == y.shape
        torch.testing.assert_close(x, y)  # exact: no product is formed
    want_n = ops.linear_norms(a, g, bias=True, method="ghost", backend="reference")
    got_n = ops.linear_norms(a, g, bias=True, method="ghost", backend=backend)
    for x, y in zip(got_n, want_n, strict=True):
        torch.testing.assert_close(x, y)
