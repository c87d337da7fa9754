"""Magnitude pruning (dpkernels.pruning): masked norms, sums, noise and sensitivity.

Oracle: per-sample gradients of the unconverted float64 model, one sample at a time (tests/oracle.py),
multiplied by the masks, clipped with c_i = min(1, R / (n_i + 1e-6)) over the masked norms (clipped_update).
Tolerance in float64: rtol 1e-9 as in tests/layers (the same sums in another order, ~1e-13 relative
apart; a wrong norm or a missed coordinate moves them by >= 1e-2).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy import stats
from torch import nn

import dpkernels
from dpkernels import pruning
from dpkernels.pruning import Mask, apply_masks, magnitude_masks, mask_of
from tests.oracle import clipped_update, per_sample_grads, sq_norms
from tests.privacy.test_certified_norms import _check, _gen, _tokens

DT = torch.float64
F64 = dict(rtol=1e-9, atol=1e-12)
EBS = 3.5


def _models(kind: str):
    """(model, x, y) in float64; every layer type masks are supported on."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))
        x, y = torch.randn(6, 4, 6), torch.randn(6, 4, 3)
    elif kind == "mlp-flat":  # one token per sample: unstructured masks take the rank-1 path
        model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))
        x, y = torch.randn(6, 6), torch.randn(6, 3)
    elif kind == "conv":
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 2, 2))
        x, y = torch.randn(6, 3, 5, 5), torch.randn(6, 2, 4, 4)
    elif kind == "conv-grouped":
        model = nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.Tanh(), nn.Conv1d(6, 2, 2))
        x, y = torch.randn(6, 4, 7), torch.randn(6, 2, 4)
    else:  # embedding with repeated tokens and a padding index, then a head
        model = nn.Sequential(nn.Embedding(7, 5, padding_idx=0), nn.Linear(5, 2))
        x = torch.randint(0, 7, (6, 5))
        x[:, 1] = x[:, 0]  # repeated tokens
        y = torch.randn(6, 5, 2)
        return model.to(DT), x, y.to(DT)
    return model.to(DT), x.to(DT), y.to(DT)


def _random_masks(model, gen, structured: str | bool):
    """Masks on every weight (and on biases for row masks): single coordinates, rows, or columns."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            if structured == "rows":
                r = torch.rand(p.shape[0], generator=gen) < 0.6
                r[0] = True
                out[name] = r.view(-1, *[1] * (p.dim() - 1)).expand(p.shape).clone()
                bias = name[: -len("weight")] + "bias"
                if bias in dict(model.named_parameters()):
                    out[bias] = r.clone()
            elif structured == "cols":
                c = torch.rand(p[0].numel(), generator=gen) < 0.6
                c[0] = True
                out[name] = c.view(1, *p.shape[1:]).expand(p.shape).clone()
            else:
                out[name] = torch.rand(p.shape, generator=gen) < 0.6
    return out


def _dp_grads(model, x, y, masks, R, strategy="bk", noise=0.0, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=noise, max_grad_norm=R, expected_batch_size=EBS, strategy=strategy, **kw
    )
    loss = ((model(x) - y) ** 2).flatten(1).sum(1).mean()
    opt.backward(loss)
    opt.step()
    return {k: p.grad for k, p in model.named_parameters()}, model


def _expected(model, x, y, masks):
    """The masked clipped update of tests/oracle.py's per-sample gradients (all-layer, R = median norm)."""
    ref = copy.deepcopy(model)
    ps = per_sample_grads(ref, lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(), (x, y))
    ps = {k: v * masks[k].to(DT) if k in masks else v for k, v in ps.items()}
    R = float(sq_norms(ps).sqrt().median())  # some samples clipped, some not
    return clipped_update(ps, [list(ps)], [R], divisor=EBS), R


CASES = [
    ("mlp", False, "bk"),
    ("mlp", "rows", "two-pass"),
    ("mlp", "cols", "bk"),
    ("mlp-flat", False, "bk"),
    ("conv", False, "two-pass"),
    ("conv", "rows", "bk"),
    ("conv", "cols", "bk"),
    ("conv-grouped", False, "bk"),
    ("conv-grouped", "rows", "bk"),
    ("embedding", False, "bk"),
    ("embedding", "rows", "two-pass"),
]


@pytest.mark.parametrize("kind,structured,strategy", CASES)
def test_masked_step_matches_naive_per_sample_gradients(kind, structured, strategy):
    model, x, y = _models(kind)
    masks = _random_masks(model, torch.Generator().manual_seed(1), structured)
    apply_masks(model, masks)
    expect, R = _expected(model, x, y, masks)
    got, dp_model = _dp_grads(model, x, y, masks, R, strategy)
    for k, m in masks.items():
        mod, attr = k.rsplit(".", 1)
        assert mask_of(dp_model.get_submodule(mod), attr).structured == (structured in ("rows", "cols") or m.all())
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], **F64, msg=lambda s, k=k: f"{k}: {s}")
        if k in masks:
            assert bool((got[k][~masks[k]] == 0).all()), k  # exactly zero, not small
    if kind == "mlp-flat":
        assert {m.dp_norm_method for m in dp_model if hasattr(m, "dp_norm_method")} == {"masked-rank1"}
    if structured in ("rows", "cols") and kind in ("mlp", "conv"):
        assert all(m.dp_norm_method.startswith("sliced-") for m in dp_model if hasattr(m, "dp_norm_method")), [
            m.dp_norm_method for m in dp_model if hasattr(m, "dp_norm_method")
        ]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_row_mask_structured_and_unstructured_paths_agree(kind):
    model, x, y = _models(kind)
    masks = _random_masks(model, torch.Generator().manual_seed(2), "rows")
    runs = []
    for force_unstructured in (False, True):
        m = copy.deepcopy(model)
        apply_masks(m, masks)
        if force_unstructured:  # the same keep pattern, treated as an arbitrary mask: masked instantiation
            for mod in m.modules():
                if pruning.has_masks(mod):
                    mod._dp_masks["weight"] = Mask(mask_of(mod, "weight").keep, None, None, False)
        got, dp = _dp_grads(m, x, y, masks, 0.5)
        methods = {mod.dp_norm_method for mod in dp if hasattr(mod, "dp_norm_method")}
        assert all(s.startswith("masked-inst" if force_unstructured else "sliced-") for s in methods), methods
        runs.append(got)
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], **F64)


# ----------------------------------------------------------------------------- certified masked norms


@pytest.mark.parametrize("kind", ["natural", "cancel", "huge", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("structured,T", [(False, 24), (False, 1), ("rows", 24), ("cols", 24)])
def test_masked_linear_norms_are_certified_upper_bounds(structured, T, dtype, kind):
    """certified_i >= exact_i (no tolerance), exact = ||m * G_i^T A_i||^2 of the stored tensors in float64;
    within 1e-3 of it on natural data (tests/privacy/test_certified_norms.py's _check). T = 1 with an
    unstructured mask is the rank-1 path; T = 24 the masked instantiation (or slicing, for rows/columns)."""
    d, p = 6, 5
    gen = _gen(("prune", structured, T, str(dtype), kind))
    a, g = _tokens(kind, dtype, T, d, p, gen)
    lin = nn.Linear(d, p)
    keep = _random_masks(lin, gen, structured)["weight"]
    apply_masks(lin, {"weight": keep}, zero=False)
    got = pruning._rows_norms(lin, a, g, mask_of(lin, "weight"))
    exact = torch.stack([((gi.double().T @ ai.double()) * keep).square().sum() for ai, gi in zip(a, g, strict=True)])
    _check(got, exact, kind, f"masked Linear ({structured}, {dtype}, {kind})")


@pytest.mark.parametrize("kind", ["natural", "huge", "tiny"])
def test_masked_conv_norms_are_certified_upper_bounds(kind):
    gen = _gen(("prune-conv", kind))
    conv = nn.Conv2d(4, 6, 3, groups=2)
    x = torch.randn(5, 4, 6, 6, generator=gen) * {"natural": 1.0, "huge": 1e18, "tiny": 1e-30}[kind]
    g = torch.randn(5, 6, 4, 4, generator=gen)
    keep = torch.rand(conv.weight.shape, generator=gen) < 0.5
    apply_masks(conv, {"weight": keep}, zero=False)
    from dpkernels.functional.conv import ConvSaved

    got = pruning._conv_norms(conv, [(ConvSaved(x, (3, 3), (1, 1), (0, 0), (1, 1), 2), g)])[id(conv.weight)]
    ps = torch.stack(
        [
            torch.ops.aten.convolution_backward(
                gi[None].double(), xi[None].double(), conv.weight.double(), None, [1, 1], [0, 0], [1, 1], False,
                [0, 0], 2, [False, True, False],
            )[1]
            for xi, gi in zip(x, g, strict=True)
        ]
    )  # fmt: skip
    _check(got, (ps * keep).flatten(1).square().sum(1), kind, f"masked grouped Conv2d ({kind})")


# ----------------------------------------------------------------------------- training with noise


def test_pruned_coordinates_get_no_gradient_and_no_noise_and_stay_put():
    """Adam, weight decay, noise on, gradient accumulation and an empty Poisson batch (the noise-only path of
    optimizer.step): the pruned weights stay exactly 0, their .grad is exactly 0 every step."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    masks = magnitude_masks(model, 0.6)
    masks.update(magnitude_masks(model, 0.5, structured="rows", include=["2"]))
    apply_masks(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, accumulation_steps=2, seed=0
    )
    params = dict(model.named_parameters())
    for step in range(4):
        opt.zero_grad()
        for micro in range(2):
            b = 0 if (step == 2 and micro == 1) else 3  # an empty micro-batch: its step is noise only there
            x = torch.randn(b, 5)
            model(x).square().sum().backward()
        opt.step()
        for k, m in masks.items():
            assert bool((params[k].grad[~m] == 0).all()), (step, k)
            assert bool((params[k].grad[m] != 0).all()), (step, k)  # noise reaches every kept coordinate
            assert bool((params[k][~m] == 0).all()), (step, k)


def test_noise_std_on_kept_coordinates_is_exact():
    """Noise only (zero output gradients): kept coordinates / (sigma R / ebs) are N(0, 1) by a KS test at
    level 1e-6 that rejects 0.67x and 1.5x the scale (the design of tests/privacy/test_noise_ks.py, N >= 4000
    values: critical distance 0.043 against 0.12 for a wrong scale); pruned coordinates are exactly 0."""
    sigma, R, ebs = 1.3, 0.7, 5.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.Unflatten(1, (256, 1)), nn.Conv1d(256, 32, 1))
    masks = {
        "0.weight": torch.rand(256, 8) < 0.5,
        "2.weight": magnitude_masks(model, 0.5, structured="rows")["2.weight"],
    }
    apply_masks(model, masks)
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=sigma, max_grad_norm=R,
        expected_batch_size=ebs, seed=1234,
    )  # fmt: skip
    std = sigma * R / ebs
    params = dict(model.named_parameters())
    vals: dict[str, list[torch.Tensor]] = {k: [] for k in masks}
    for _ in range(5):
        opt.zero_grad()
        (model(torch.randn(3, 8)) * 0).sum().backward()  # zero output gradients: the step is noise only
        opt.step()
        for k, m in masks.items():
            assert bool((params[k].grad[~m] == 0).all())
            vals[k].append(params[k].grad[m].double() / std)
    for k, v in vals.items():
        z = torch.cat(v)
        assert z.numel() >= 4000, (k, z.numel())
        assert stats.kstest(z.numpy(), "norm").pvalue > 1e-6, k
        for wrong in (0.67, 1.5):
            assert stats.kstest((z / wrong).numpy(), "norm").pvalue < 1e-6, (k, wrong)


# ----------------------------------------------------------------------------- sensitivity


def _update(model, opt, x, y):
    opt.zero_grad()
    ((model(x) - y) ** 2).flatten(1).sum(1).mean().backward()
    opt.step()
    return torch.cat([p.grad.detach().double().flatten() for p in model.parameters()])


@pytest.mark.parametrize("adversary", ["huge", "cancel"])
@pytest.mark.parametrize("structured", [False, "rows"])
def test_one_adversarial_sample_moves_the_masked_update_by_at_most_r(structured, adversary):
    """float32, noise off: remove-one <= R, replace-one <= 2R (times ebs), with adversarial samples whose raw
    float32 norms are wrong (1e18 inputs; cancelling tokens a, a + 1e-4 with output gradients w, -w).
    Tolerance 1e-5 as tests/privacy/test_sensitivity.py (float32 sums of a few clipped O(R) vectors)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    apply_masks(model, magnitude_masks(model, 0.5, structured=structured))
    R, B, j = 1e-2, 4, 1
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=R,
        expected_batch_size=EBS,
    )  # fmt: skip

    def adversarial(seed):
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(B, 4, 6, generator=gen), torch.randn(B, 4, 3, generator=gen)
        if adversary == "huge":
            x[j] *= 1e18
        else:
            x[j, 1] = x[j, 0] + 1e-4 * torch.randn(6, generator=gen)
            with torch.no_grad():
                out = model(x[j : j + 1])[0]
            r = torch.randn(3, generator=gen)
            y[j, 0], y[j, 1] = out[0] - 0.5e4 * r, out[1] + 0.5e4 * r
        return x, y

    x, y = adversarial(5)
    full = _update(model, opt, x, y)
    keep = [i for i in range(B) if i != j]
    d = float((full - _update(model, opt, x[keep], y[keep])).norm()) * EBS
    assert math.isfinite(d) and d <= R * (1 + 1e-5), d / R
    x2, y2 = adversarial(6)
    xr, yr = x.clone(), y.clone()
    xr[j], yr[j] = x2[j], y2[j]
    d = float((full - _update(model, opt, xr, yr)).norm()) * EBS
    assert math.isfinite(d) and d <= 2 * R * (1 + 1e-5), d / R


# ----------------------------------------------------------------------------- choosing masks, refusals


def test_magnitude_masks_prune_the_smallest_weights_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Conv1d(20, 8, 3), nn.Embedding(5, 4))
    m = magnitude_masks(model, 0.75)
    assert set(m) == {"0.weight", "2.weight"}  # Linear and Conv weights by default, no biases, no Embedding
    for k, keep in m.items():
        w = dict(model.named_parameters())[k].detach().abs()
        assert int((~keep).sum()) == math.floor(0.75 * w.numel())
        assert w[keep].min() >= w[~keep].max()
    g = magnitude_masks(model, 0.75, scope="global")
    allw = torch.cat([dict(model.named_parameters())[k].detach().abs().flatten() for k in g])
    kept = torch.cat([dict(model.named_parameters())[k].detach().abs()[g[k]] for k in g])
    assert int(sum((~v).sum() for v in g.values())) == math.floor(0.75 * allw.numel())
    assert kept.min() >= allw.sort().values[math.floor(0.75 * allw.numel()) - 1]
    r = magnitude_masks(model, 0.5, structured="rows", include=["0", "3"])
    assert set(r) == {"0.weight", "0.bias", "3.weight"}
    rows = r["0.weight"].all(dim=1)
    assert torch.equal(r["0.weight"], rows[:, None].expand(20, 10)) and torch.equal(r["0.bias"], rows)
    assert int(rows.sum()) == 10
    apply_masks(model, r)
    assert bool((model[0].weight[~r["0.weight"]] == 0).all()) and pruning.sparsity_of(model) > 0
    assert mask_of(model[0], "weight").structured and mask_of(model[0], "weight").rows.numel() == 10
    # masks live on the module: a deep copy keeps them (make_private on a copy still prunes)
    assert torch.equal(mask_of(copy.deepcopy(model)[0], "weight").keep, r["0.weight"])


def test_masks_on_unsupported_or_shared_parameters_are_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"'1\.weight' belongs to LayerNorm '1'.*Linear"):
        apply_masks(model, {"1.weight": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask of '0\.weight' has shape \(4,\)"):
        apply_masks(model, {"0.weight": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no parameter 'x'"):
        apply_masks(model, {"x": torch.ones(4)})
    emb = nn.Embedding(6, 4)
    head = nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    tied = nn.Sequential(emb, head)
    with pytest.raises(ValueError, match="shared by modules"):
        apply_masks(tied, {"0.weight": torch.ones(6, 4, dtype=torch.bool)})
    # a mask set by hand on a LayerNorm after make_private: refused at backward, naming the layer
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
        expected_batch_size=2,
    )  # fmt: skip
    model[1]._dp_masks = {"weight": Mask.of(torch.ones(4, dtype=torch.bool))}
    with pytest.raises(ValueError, match=r"DPLayerNorm '1' has pruning masks on \['weight'\]"):
        model(torch.randn(2, 4)).sum().backward()


def test_pruning_with_perturbed_clipping_is_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    apply_masks(model, magnitude_masks(model, 0.5))
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
        expected_batch_size=2, perturb_k=0.1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="pruning masks and the engine clips perturbed gradients"):
        model(torch.randn(2, 4)).sum().backward()
