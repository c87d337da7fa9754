"""Perturbed clipping (make_private(..., perturb_k=k), dpkernels.perturb): one noiseless step equals
sum_i c_i (g_i + k zeta_i) / E with c_i the clip factor of ||g_i + k zeta_i|| over each group, from naive
per-sample gradients in float64 (the zoo's torch.func oracle; a loop over batches of one for MHA, RNNs and
a tapped parameter) and the same zeta_i regenerated from its seed; k = 0 is plain clipping exactly; the
sensitivity (remove-one, replace-one, adversarial samples) stays <= R.

Tolerance: float64 throughout, as tests/engine/test_modes.py (its comment gives the margin): the engine
instantiates h_i with other summation orders than the oracle, < 1e-13 relative; rtol=1e-9 still fails on
any wrong factor, zeta (a different draw moves the update by O(k)) or scale.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels.clipping import clip_factors
from dpkernels.perturb import Perturbation, zeta, zeta_seed

from .zoo import CASES, batch, batch_loss, per_sample_grads, reference_groups, require, trainable

TOL = dict(rtol=1e-9, atol=1e-12)
B, EBS, K, SEED = 5, 4.0, 0.8, 11


def _zetas(model, opt, names, b, micro=0, step=0) -> dict[str, torch.Tensor]:
    """zeta_i of each parameter, regenerated from the engine's key (seed, step, micro, parameter, rank, i)."""
    eng, tp = opt.engine, trainable(model)
    return {
        n: torch.stack(
            [zeta(tp[n].shape, zeta_seed(SEED, step, micro, eng._index[id(tp[n])], 0, i), "cpu") for i in range(b)]
        )
        for n in names
    }


def _expected(ps, zs, groups, bounds, k, divide_by):
    """sum_i c_i (g_i + k zeta_i) / divide_by, c_i = min(1, R / (||g_i + k zeta_i||_group + 1e-6))."""
    out = {}
    for names, R in zip(groups, bounds, strict=True):
        v = {n: ps[n] + k * zs[n] for n in names}
        norm = torch.stack([v[n].flatten(1).square().sum(1) for n in names]).sum(0).sqrt()
        c = torch.minimum(torch.ones_like(norm), R / (norm + 1e-6))
        for n in names:
            out[n] = torch.einsum("b,b...->...", c, v[n]) / divide_by
    return out


def _make(model, k=K, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    kw.setdefault("noise_multiplier", 0.0)
    kw.setdefault("expected_batch_size", EBS)
    return dpkernels.make_private(model, opt, perturb_k=k, seed=SEED, **kw)


def _backward(opt, loss, strategy):
    opt.backward(loss) if strategy == "two-pass" else loss.backward()


# every zoo model once, (groups, strategy, reduction) taken in turn; the MLP over the whole grid
_GRID = list(itertools.product(("all-layer", "layer-wise"), ("bk", "two-pass"), ("mean", "sum")))
_PARAMS = [
    pytest.param(c, *_GRID[i % len(_GRID)], id=f"{c.name}-{'-'.join(_GRID[i % len(_GRID)])}")
    for i, c in enumerate(CASES)
]
_PARAMS += [pytest.param(CASES[0], *g, id=f"mlp-{'-'.join(g)}") for g in _GRID[1:]]


@pytest.mark.parametrize("case,groups,strategy,reduction", _PARAMS)
def test_perturbed_step_equals_naive(case, groups, strategy, reduction):
    require(case)
    x, y = batch(case, B)
    model = case.build()
    ps = per_sample_grads(model, case, x, y)
    gs = reference_groups(model, groups)
    R = 1.0  # per-sample norms of g_i + k zeta_i are O(1..10) here: most samples are clipped, some not
    bounds = [R / len(gs) ** 0.5] * len(gs)
    model, opt = _make(model, max_grad_norm=R, groups=groups, strategy=strategy, loss_reduction=reduction)
    zs = _zetas(model, opt, list(ps), B)
    want = _expected(ps, zs, gs, bounds, K, EBS if reduction == "mean" else 1.0)
    _backward(opt, batch_loss(case, model(x), y, reduction), strategy)
    opt.step()
    for n, p in trainable(model).items():
        torch.testing.assert_close(p.grad, want[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")
    assert "perturbed-instantiation" in opt.engine.report()


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True, add_bias_kv=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class _Rnn(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = {"lstm": nn.LSTM(4, 5, batch_first=True, proj_size=3), "gru": nn.GRU(4, 5, batch_first=True)}[kind]
        self.head = nn.Linear(self.rnn.proj_size or 5, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _Pos(nn.Module):
    """A (1, T, d) position table broadcast over the batch (a tapped raw parameter)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 3, 4))

    def forward(self, x):
        return x + self.pos


def _pos_model():
    m = nn.Sequential(_Pos(), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    dpkernels.tap_parameters(m[0], ["pos"])
    return m


_LOOP_MODELS = {"mha": _Attn, "lstm-proj": lambda: _Rnn("lstm"), "gru": lambda: _Rnn("gru"), "tap": _pos_model}


def _loop_grads(model, x, y):
    """Naive oracle: one backward per sample on an unconverted float64 copy."""
    ref = copy.deepcopy(model)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(x.shape[0]):
        ref.zero_grad(set_to_none=True)
        (ref(x[i : i + 1]) - y[i : i + 1]).square().sum().backward()
        for n, p in ref.named_parameters():
            if n in out:
                out[n].append(p.grad.clone())
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("name", list(_LOOP_MODELS))
@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
def test_perturbed_step_other_layers(name, strategy):
    torch.manual_seed(0)
    model = _LOOP_MODELS[name]().double()
    x, y = torch.randn(B, 3, 4 if name != "mha" else 6, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64)
    ps = _loop_grads(model, x, y)
    model, opt = _make(model, max_grad_norm=1.0, groups="layer-wise", strategy=strategy, loss_reduction="sum")
    gs = reference_groups(model, "layer-wise")
    zs = _zetas(model, opt, list(ps), B)
    want = _expected(ps, zs, gs, [1.0 / len(gs) ** 0.5] * len(gs), K, 1.0)
    _backward(opt, (model(x) - y).square().sum(), strategy)
    opt.step()
    for n, p in trainable(model).items():
        torch.testing.assert_close(p.grad, want[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


def test_accumulation_draws_a_zeta_per_micro_batch():
    case = CASES[0]
    x, y = batch(case, 2 * B)
    model = case.build()
    ps = per_sample_grads(model, case, x, y)
    model, opt = _make(model, max_grad_norm=1.0, accumulation_steps=2)
    names = list(ps)
    z0, z1 = _zetas(model, opt, names, B, micro=0), _zetas(model, opt, names, B, micro=1)
    zs = {n: torch.cat([z0[n], z1[n]]) for n in names}
    want = _expected(ps, zs, [names], [1.0], K, EBS)
    for sl in (slice(0, B), slice(B, 2 * B)):
        batch_loss(case, model(x[sl]), y[sl], "mean").backward()
    opt.step()
    for n, p in trainable(model).items():
        torch.testing.assert_close(p.grad, want[n], **TOL)
    # the next step draws new zeta (the step is in the key): the same batch gives another update
    first = {n: p.grad.clone() for n, p in trainable(model).items()}
    for sl in (slice(0, B), slice(B, 2 * B)):
        batch_loss(case, model(x[sl]), y[sl], "mean").backward()
    opt.step()
    assert any(not torch.equal(first[n], p.grad) for n, p in trainable(model).items())


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
def test_k_zero_is_plain_clipping(strategy):
    case = CASES[0]
    x, y = batch(case, B)
    grads = []
    for k in (None, 0.0):
        model = case.build()
        kw = {} if k is None else {"perturb_k": k}
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        model, opt = dpkernels.make_private(
            model, opt, noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=EBS, seed=SEED,
            strategy=strategy, **kw,
        )  # fmt: skip
        assert opt.engine.perturb is None
        _backward(opt, batch_loss(case, model(x), y, "mean"), strategy)
        opt.step()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_k_is_refused():
    for k in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="perturb_k"):
            _make(nn.Linear(3, 2), k=k)


# ----------------------------------------------------------------------------- sensitivity


def _update(xs, ys, k, R, dtype=torch.float32):
    """The noiseless summed update (loss_reduction="sum") of a float32 MLP on the batch (xs, ys)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)
    model, opt = _make(model, k=k, max_grad_norm=R, loss_reduction="sum")
    (model(xs) - ys).square().sum().backward()
    opt.step()
    return torch.cat([p.grad.double().flatten() for p in model.parameters()])


def _adversarial():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(6, 4, generator=g)
    ys = torch.randn(6, 2, generator=g)
    huge = torch.full((1, 4), 1e15)
    tiny = torch.full((1, 4), 1e-30)
    return xs, ys, [(huge, torch.full((1, 2), -1e15)), (tiny, torch.zeros(1, 2)), (-huge, torch.full((1, 2), 1e15))]


@pytest.mark.parametrize("k", [0.3, 1e6])
def test_sensitivity_remove_and_replace_one(k):
    """The adversarial sample last keeps every other sample's index, so its zeta: the updates of D and of
    D without it differ by its own clipped contribution only, ||c_j v_j|| <= R; replacing it by another
    adversarial sample moves the update by <= 2R. The margin 1e-5 R: float32 rounding of the final sums."""
    R = 0.7
    xs, ys, adv = _adversarial()
    base = _update(xs, ys, k, R)
    ups = [_update(torch.cat([xs, ax]), torch.cat([ys, ay]), k, R) for ax, ay in adv]
    for u in ups:
        assert float((u - base).norm()) <= R * (1 + 1e-5)
    for u, w in itertools.combinations(ups, 2):
        assert float((u - w).norm()) <= 2 * R * (1 + 1e-5)
    for ax, ay in adv:  # a batch of one: the whole update is that sample's contribution
        assert float(_update(ax, ay, k, R).norm()) <= R * (1 + 1e-5)


def test_a_larger_recomputation_is_shrunk(monkeypatch):
    """The sum stage re-instantiates h_i; if that came out larger than what the factor was taken from (a
    nondeterministic kernel), the sample's part is shrunk so that ||c_i v_i|| <= R still holds."""
    calls = {"n": 0}
    orig = Perturbation._instances

    def larger_the_second_time(self, engine, tie, lo, hi, B, want):
        out = orig(self, engine, tie, lo, hi, B, want)
        calls["n"] += 1
        return {p: t * 1e3 for p, t in out.items()} if engine._factors[0] is not None else out

    monkeypatch.setattr(Perturbation, "_instances", larger_the_second_time)
    xs, ys, adv = _adversarial()
    R = 0.7
    for i in range(3):
        u = _update(xs[i : i + 1], ys[i : i + 1], 0.1, R)
        assert float(u.norm()) <= R * (1 + 1e-5)
    assert calls["n"] > 0


def test_clip_factors_bound_the_perturbed_vector():
    """c_i ||v_i|| <= R with c_i from the certified norm: the property the sensitivity rests on, checked
    on extreme norms directly."""
    n = torch.tensor([0.0, 1e-300, 1.0, 1e300, 7.3], dtype=torch.float64)
    c = clip_factors(n, 0.5)
    assert bool((c * n <= 0.5).all())


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_the_mechanism_noise_is_unchanged(accumulation_steps):
    """With perturb_k > 0 the Gaussian mechanism adds the very noise of plain clipping (same seeds, std
    sigma R_total / E): the two updates differ by at most the two clipped sums, 2 n R / E for n samples, while
    the noise is ~sigma R sqrt(P) / E ~ 1400 R / E (another draw would differ by ~2000 R / E)."""
    case = CASES[0]
    x, y = batch(case, 2 * B)
    R, sigma = 1e-3, 100.0
    grads = []
    for k in (0.0, 5.0):
        model = case.build()
        model, opt = _make(model, k=k, noise_multiplier=sigma, max_grad_norm=R, accumulation_steps=accumulation_steps)
        for sl in torch.arange(2 * B).chunk(accumulation_steps):
            batch_loss(case, model(x[sl]), y[sl], "mean").backward()
        opt.step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float(grads[0].norm()) > 500 * R / EBS
    assert float((grads[0] - grads[1]).norm()) <= 2 * (2 * B) * R / EBS * (1 + 1e-6)
    assert 0.8 < float(grads[0].std() * EBS / (sigma * R)) < 1.2  # ~200 coordinates: std within 20 %
