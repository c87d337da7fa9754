"""dpkernels.api (per_sample_norms, clipped_sum) vs naive per-sample gradients, in float64.

The oracle is a loop over samples: sample i's gradient is that of the loss through output i alone,
computed by autograd on a batch of one. grad_output is what a hook sees: dL/dy of the batch's loss,
for loss reduction "sum" (sum_i <y_i, U_i>) and "mean" (the same divided by B), so per-sample
gradients carry the 1/B factor for "mean" as well.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels import api, ops

DT = torch.float64
# Tolerances for float64: norms and sums are sums of at most a few hundred products of O(1) terms
# computed in a different order (Gram matrices, unfold, index_add) than the oracle's autograd; the
# rounding error is then ~n * 1.1e-16 relative, far under 1e-10. atol covers exact zeros (padding rows).
TOL = dict(rtol=1e-10, atol=1e-12)


def _ids(shape, V, gen):
    ids = torch.randint(0, V, shape, generator=gen)
    if ids.numel() > 1:
        ids.view(-1)[1] = ids.view(-1)[0]  # a repeated token: its rows must be summed before squaring
    return ids


def _frozen_weight_linear() -> nn.Module:
    m = nn.Linear(5, 3)
    m.weight.requires_grad_(False)  # only the bias is trainable: the weight must be absent from the results
    return m


# name -> (module factory, input factory (B, generator) -> input)
CASES = {
    "linear_3d": (lambda: nn.Linear(5, 7), lambda B, g: torch.randn(B, 3, 5, generator=g, dtype=DT)),
    "linear_T1": (lambda: nn.Linear(5, 7), lambda B, g: torch.randn(B, 1, 5, generator=g, dtype=DT)),
    "linear_2d_nobias": (lambda: nn.Linear(4, 3, bias=False), lambda B, g: torch.randn(B, 4, generator=g, dtype=DT)),
    "linear_4d_inst": (  # T = 6 with d = p = 2: the FLOP rule picks instantiation
        lambda: nn.Linear(2, 2),
        lambda B, g: torch.randn(B, 2, 3, 2, generator=g, dtype=DT),
    ),
    "linear_frozen_weight": (_frozen_weight_linear, lambda B, g: torch.randn(B, 3, 5, generator=g, dtype=DT)),
    "conv1d": (
        lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
        lambda B, g: torch.randn(B, 3, 9, generator=g, dtype=DT),
    ),
    "conv1d_T1": (lambda: nn.Conv1d(2, 3, 5), lambda B, g: torch.randn(B, 2, 5, generator=g, dtype=DT)),
    "conv2d_groups_reflect": (
        lambda: nn.Conv2d(4, 6, (2, 3), groups=2, padding=1, padding_mode="reflect", bias=False),
        lambda B, g: torch.randn(B, 4, 5, 4, generator=g, dtype=DT),
    ),
    "conv2d_same_even_kernel": (
        lambda: nn.Conv2d(3, 5, 2, padding="same", dilation=(1, 2)),
        lambda B, g: torch.randn(B, 3, 4, 5, generator=g, dtype=DT),
    ),
    "conv3d": (
        lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(0, 1, 0)),
        lambda B, g: torch.randn(B, 2, 3, 4, 3, generator=g, dtype=DT),
    ),
    "embedding_padding": (lambda: nn.Embedding(11, 4, padding_idx=2), lambda B, g: _ids((B, 7), 11, g)),
    "embedding_3d_ids": (lambda: nn.Embedding(5, 3), lambda B, g: _ids((B, 2, 3), 5, g)),
    "embedding_T1": (lambda: nn.Embedding(6, 3), lambda B, g: _ids((B, 1), 6, g)),
    "layernorm_2d_shape": (lambda: nn.LayerNorm((3, 5)), lambda B, g: torch.randn(B, 2, 3, 5, generator=g, dtype=DT)),
    "layernorm_nobias_T1": (
        lambda: nn.LayerNorm(5, bias=False),
        lambda B, g: torch.randn(B, 1, 5, generator=g, dtype=DT),
    ),
    "rmsnorm": (lambda: nn.RMSNorm(6), lambda B, g: torch.randn(B, 3, 6, generator=g, dtype=DT)),
    "groupnorm_2d": (lambda: nn.GroupNorm(2, 4), lambda B, g: torch.randn(B, 4, 3, 3, generator=g, dtype=DT)),
    "groupnorm_1d": (lambda: nn.GroupNorm(3, 3), lambda B, g: torch.randn(B, 3, 5, generator=g, dtype=DT)),
}


def _setup(case: str, B: int, reduction: str, seed: int = 0):
    """module (float64), its input x, the hook's grad_output, and the oracle's per-sample gradients."""
    make, make_x = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = make().to(DT)
    with torch.no_grad():  # non-trivial affine parameters (they start at 1 and 0)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    x = make_x(B, gen)
    y = m(x)
    U = torch.randn(y.shape, generator=gen, dtype=DT)
    div = float(B) if reduction == "mean" else 1.0
    # What a hook sees: the gradient of the batch loss with respect to the output.
    (g,) = torch.autograd.grad((y * U).sum() / div, y)
    params = [p for p in m.parameters() if p.requires_grad]
    per_sample = {id(p): torch.zeros(B, *p.shape, dtype=DT) for p in params}
    for i in range(B):
        yi = m(x[i : i + 1])
        grads = torch.autograd.grad((yi * U[i : i + 1]).sum() / div, params)
        for p, gp in zip(params, grads):
            per_sample[id(p)][i] = gp
    return m, x, g, params, per_sample


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("B", [0, 1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_norms_and_clipped_sum(case, B, reduction):
    m, x, g, params, ps = _setup(case, B, reduction)
    norms = api.per_sample_norms(m, x, g)
    assert [id(p) for p in norms] == [id(p) for p in params]  # every trainable parameter, nothing frozen
    for p in params:
        want = ps[id(p)].flatten(1).square().sum(1)
        assert norms[p].shape == (B,) and norms[p].dtype == DT
        torch.testing.assert_close(norms[p], want, **TOL)

    c = torch.rand(B, generator=torch.Generator().manual_seed(1), dtype=DT)
    sums = api.clipped_sum(m, x, g, c, scale=0.25)
    assert [id(p) for p in sums] == [id(p) for p in params]
    for p in params:
        want = 0.25 * torch.einsum("b...,b->...", ps[id(p)], c)
        assert sums[p].shape == p.shape
        torch.testing.assert_close(sums[p], want, **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_a_sample_with_factor_zero_adds_nothing_even_non_finite(case):
    """clip_factors c_i = 0 for a sample whose activations or output gradients hold NaN / inf: the sums are those
    of the other samples (the ops select, never 0 * NaN)."""
    m, x, g, params, ps = _setup(case, 3, "sum")
    c = torch.tensor([0.5, 0.0, 0.75], dtype=DT)
    g = g.clone()
    g[1] = float("nan")
    if x.is_floating_point():
        x = x.clone()
        x[1] = float("inf")
    sums = api.clipped_sum(m, x, g, c)
    for p in params:
        want = torch.einsum("b...,b->...", ps[id(p)][[0, 2]], c[[0, 2]])
        torch.testing.assert_close(sums[p], want, **TOL)


def test_hook_list_form_and_no_side_effect():
    """Opacus hooks pass the forward inputs as a list; the caller's module gets no new attribute."""
    m, x, g, params, _ = _setup("conv1d", 3, "sum")
    before = set(vars(m))
    a = api.per_sample_norms(m, [x], g)
    b = api.per_sample_norms(m, x, g)
    for p in params:
        torch.testing.assert_close(a[p], b[p], rtol=0, atol=0)  # the same computation
    assert set(vars(m)) == before


def test_dp_twin_accepted():
    """A DP layer (here DPLayerNorm, no engine attached) is served like its torch layer."""
    m, x, g, params, ps = _setup("layernorm_2d_shape", 3, "sum")
    twin = dpkernels.DPLayerNorm.from_module(m)
    norms = api.per_sample_norms(twin, x, g)
    for p in params:
        torch.testing.assert_close(norms[p], ps[id(p)].flatten(1).square().sum(1), **TOL)


@pytest.mark.slow  # importing transformers alone takes ~8 s here
def test_hf_layers():
    """transformers' GPT-2 Conv1D (weight (d_in, d_out), clipped sum in that layout) and LlamaRMSNorm."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(0)
    m = Conv1D(7, 5).to(DT)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=DT))
    x = torch.randn(3, 4, 5, generator=gen, dtype=DT)
    U = torch.randn(3, 4, 7, generator=gen, dtype=DT)
    ps = [torch.autograd.grad((m(x[i : i + 1]) * U[i : i + 1]).sum(), [m.weight, m.bias]) for i in range(3)]
    norms = api.per_sample_norms(m, x, U)
    torch.testing.assert_close(norms[m.weight], torch.stack([w.square().sum() for w, _ in ps]), **TOL)
    torch.testing.assert_close(norms[m.bias], torch.stack([b.square().sum() for _, b in ps]), **TOL)
    c = torch.tensor([0.5, 1.0, 0.25], dtype=DT)
    sums = api.clipped_sum(m, x, U, c)
    torch.testing.assert_close(sums[m.weight], sum(ci * w for ci, (w, _) in zip(c, ps)), **TOL)

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rms = LlamaRMSNorm(5).to(DT)
    with torch.no_grad():
        rms.weight.copy_(torch.randn(5, generator=gen, dtype=DT))
    Ur = torch.randn(3, 4, 5, generator=gen, dtype=DT)
    psr = [torch.autograd.grad((rms(x[i : i + 1]) * Ur[i : i + 1]).sum(), rms.weight)[0] for i in range(3)]
    torch.testing.assert_close(
        api.per_sample_norms(rms, x, Ur)[rms.weight], torch.stack([w.square().sum() for w in psr]), **TOL
    )
    torch.testing.assert_close(api.clipped_sum(rms, x, Ur, c)[rms.weight], sum(ci * w for ci, w in zip(c, psr)), **TOL)


# ----------------------------------------------------------------------------- noise


def test_noise_distribution_and_seeds():
    """out = scale * (sum + noise_std z): z is standard normal, dense, keyed by seed, independent per parameter."""
    m = nn.Embedding(400, 50, padding_idx=2).to(DT)  # 20000 coordinates; the batch touches at most 21 rows
    ids = torch.randint(0, 400, (3, 7), generator=torch.Generator().manual_seed(2))
    g = torch.randn(3, 7, 50, dtype=DT)
    c = torch.ones(3, dtype=DT)
    clean = api.clipped_sum(m, ids, g, c, scale=0.5)[m.weight]
    noisy = api.clipped_sum(m, ids, g, c, noise_std=2.0, scale=0.5, seed=7)[m.weight]
    z = (noisy - clean) / (2.0 * 0.5)
    # Sample std of n = 20000 standard normals: standard error 1/sqrt(2n) = 0.005; 0.03 is 6 of them.
    assert abs(float(z.std()) - 1.0) < 0.03 and abs(float(z.mean())) < 0.03
    untouched = torch.ones(400, dtype=torch.bool)
    untouched[ids.unique()] = False
    assert bool((z[untouched] != 0).all())  # noise on rows no sample used: their absence must not show
    again = api.clipped_sum(m, ids, g, c, noise_std=2.0, scale=0.5, seed=7)[m.weight]
    torch.testing.assert_close(again, noisy, rtol=0, atol=0)  # reproducible from the seed
    other = api.clipped_sum(m, ids, g, c, noise_std=2.0, scale=0.5, seed=8)[m.weight]
    assert not torch.equal(other, noisy)
    # An empty batch's result is the same noise alone (z is keyed by the seed, not by the batch).
    empty = api.clipped_sum(m, ids[:0], g[:0], c[:0], noise_std=2.0, scale=0.5, seed=7)[m.weight]
    torch.testing.assert_close(empty, noisy - clean, rtol=0, atol=1e-12)  # float64 rounding of one subtraction

    lin = nn.Linear(6, 6).to(DT)
    a, gl, cl = torch.randn(2, 3, 6, dtype=DT), torch.randn(2, 3, 6, dtype=DT), torch.ones(2, dtype=DT)
    clean_l = api.clipped_sum(lin, a, gl, cl)
    noisy_l = api.clipped_sum(lin, a, gl, cl, noise_std=1.0, seed=3)
    zw = (noisy_l[lin.weight] - clean_l[lin.weight]).reshape(-1)[:6]
    zb = noisy_l[lin.bias] - clean_l[lin.bias]
    assert not torch.allclose(zw, zb)  # weight and bias draw different noise, though they share one seed


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("B,T", [(0, 3), (1, 1), (3, 5)])
def test_linear_triton_backend(B, T):
    """The triton backend (CPU interpreter in tests) gives the naive norms and sums; the choice is restored."""
    if "triton" not in dpkernels.available_backends():
        pytest.skip("triton backend not available here")
    gen = torch.Generator().manual_seed(0)
    m = nn.Linear(5, 7).to(DT)
    x = torch.randn(B, T, 5, generator=gen, dtype=DT)
    U = torch.randn(B, T, 7, generator=gen, dtype=DT)
    ps = [torch.autograd.grad((m(x[i : i + 1]) * U[i : i + 1]).sum(), [m.weight, m.bias]) for i in range(B)]
    ops.last_backend.clear()
    norms = api.per_sample_norms(m, x, U, backend="triton")
    assert ops.last_backend.get("linear_norms") == ("triton" if B else None)  # an empty batch runs no kernel
    assert dpkernels.get_backend() == "auto"
    want_w = torch.stack([w.square().sum() for w, _ in ps]) if B else torch.zeros(0, dtype=DT)
    want_b = torch.stack([b.square().sum() for _, b in ps]) if B else torch.zeros(0, dtype=DT)
    torch.testing.assert_close(norms[m.weight], want_w, **TOL)
    torch.testing.assert_close(norms[m.bias], want_b, **TOL)
    c = torch.rand(B, generator=gen, dtype=DT)
    sums = api.clipped_sum(m, x, U, c, backend="triton")
    assert ops.last_backend.get("linear_clipped_sum") == ("triton" if B else None)
    want = sum((ci * w for ci, (w, _) in zip(c, ps)), torch.zeros_like(m.weight))
    torch.testing.assert_close(sums[m.weight], want, **TOL)


def test_reference_backend_forced_and_restored():
    dpkernels.set_backend("reference")
    m, x, g, _, _ = _setup("linear_3d", 2, "sum")
    api.per_sample_norms(m, x, g, backend="reference")
    assert ops.last_backend["linear_norms"] == "reference"
    assert dpkernels.get_backend() == "reference"  # a forced choice survives the call
    with pytest.raises(ValueError, match="unknown backend"):
        api.per_sample_norms(m, x, g, backend="nope")
    assert dpkernels.get_backend() == "reference"


def test_backend_choice_is_per_thread():
    """use_backend (what api's backend= uses) holds for its own thread only; set_backend for all."""
    if "triton" not in dpkernels.available_backends():
        pytest.skip("triton backend not available here")
    x = torch.zeros(1, device="cpu")  # auto picks the reference for CPU tensors
    entered, checked = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def worker():
        with dpkernels.use_backend("triton"):
            seen["inside"] = (dpkernels.get_backend(), ops.resolve("linear_norms", x).__module__)
            entered.set()
            checked.wait(timeout=30)
        seen["after"] = dpkernels.get_backend()

    t = threading.Thread(target=worker)
    t.start()
    assert entered.wait(timeout=30)
    main = (dpkernels.get_backend(), ops.resolve("linear_norms", x).__module__)  # while the worker is inside
    checked.set()
    t.join(timeout=30)
    assert seen["inside"][0] == "triton" and seen["inside"][1].startswith("dpkernels.ops.triton")
    assert main[0] == "auto" and main[1].startswith("dpkernels.ops.reference")  # CPU tensor: reference
    assert seen["after"] == "auto"
    dpkernels.set_backend("reference")
    with dpkernels.use_backend("auto"):  # a block may ask for the automatic choice under a forced one
        assert dpkernels.get_backend() == "auto"
    assert dpkernels.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown backend"), dpkernels.use_backend("nope"):
        pass


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_layer():
    with pytest.raises(TypeError, match="BatchNorm1d is not supported"):
        api.per_sample_norms(nn.BatchNorm1d(3), torch.randn(2, 3), torch.randn(2, 3))
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"Linear: .*\(B, \.\.\., 4\)"):
        api.per_sample_norms(lin, torch.randn(2, 5), torch.randn(2, 3))
    with pytest.raises(ValueError, match="same batch size"):
        api.per_sample_norms(lin, torch.randn(2, 4), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"clip_factors must have shape \(2,\)"):
        api.clipped_sum(lin, torch.randn(2, 4), torch.randn(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        api.per_sample_norms(
            nn.Embedding(5, 2, scale_grad_by_freq=True), torch.zeros(2, 3).long(), torch.randn(2, 3, 2)
        )
    with pytest.raises(ValueError, match="Conv2d: .*2-d convolution"):
        api.per_sample_norms(nn.Conv2d(1, 1, 1), torch.randn(1, 4, 4), torch.randn(1, 4, 4))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    assert api.per_sample_norms(frozen, torch.randn(2, 2), torch.randn(2, 2)) == {}
    assert api.supported(nn.GroupNorm(1, 2)) and not api.supported(nn.ReLU())


def test_noise_seed_defaults_to_fresh_per_call():
    """Without a seed two calls draw independent noise (a constant default would repeat it every step,
    and subtracting two updates would remove it); with one, a call is reproducible."""
    m, x, g, _, _ = _setup("linear_3d", 3, "sum")
    c = torch.ones(3, dtype=g.dtype)
    a = api.clipped_sum(m, x, g, c, noise_std=1.0)
    b = api.clipped_sum(m, x, g, c, noise_std=1.0)
    assert all(not torch.equal(a[p], b[p]) for p in a)
    s1 = api.clipped_sum(m, x, g, c, noise_std=1.0, seed=5)
    s2 = api.clipped_sum(m, x, g, c, noise_std=1.0, seed=5)
    assert all(torch.equal(s1[p], s2[p]) for p in s1)


def test_op_entry_points_carry_the_reference_signatures():
    """mypy and IDEs see each op's real arguments: a generated entry point has the reference op's signature;
    a hand-written one (a first argument that may be None, so no tensor to dispatch on) the reference's
    arguments and ``backend``."""
    import inspect

    from dpkernels.ops import reference

    for op in ops.OPS:
        entry, ref_op = getattr(ops, op), getattr(reference, op)
        if getattr(entry, "__wrapped__", None) is ref_op:
            assert inspect.signature(entry) == inspect.signature(ref_op), op
        else:
            names = list(inspect.signature(entry).parameters)
            assert names == [*inspect.signature(ref_op).parameters, "backend"], op


def test_a_backend_with_a_drifted_signature_is_refused(monkeypatch):
    import types

    fake = types.ModuleType("dpkernels.ops.fake")
    fake.__all__ = ["bias_norms"]
    fake.bias_norms = lambda g, extra: g  # type: ignore[attr-defined]
    monkeypatch.setitem(ops._loaded, "fake", fake)
    monkeypatch.delitem(ops._served, "fake", raising=False)
    with pytest.raises(TypeError, match="fake.*bias_norms"):
        ops.served("fake")


def test_a_forced_backend_without_the_op_warns_and_the_reference_serves(monkeypatch):
    import types

    fake = types.ModuleType("dpkernels.ops.fake")
    fake.__all__ = []
    monkeypatch.setitem(ops._loaded, "fake", fake)
    monkeypatch.setitem(ops._served, "fake", {})
    monkeypatch.setattr(ops, "_warned", set())
    g = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="'fake' has no bias_norms"):
        out = ops.bias_norms(g, backend="fake")
    assert ops.last_backend["bias_norms"] == "reference"
    torch.testing.assert_close(out, ops.reference.bias_norms(g))
