"""Adaptive (quantile) clipping (dpkernels.adaptive): the bounds follow a quantile of the per-sample norms, each
step's clipped sum and private count keep their sensitivities with the bound of that step, the gradient gets
noise sigma_grad R_t, and the account is that of the overall noise multiplier sigma."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scipy import stats
from torch import nn

import dpkernels
from dpkernels.adaptive import AdaptiveClipping, AdaptiveState, grad_noise_multiplier, set_bounds
from tests.engine.test_syncs import SyncCounter
from tests.engine.zoo import BY_NAME, batch, batch_loss, per_sample_grads, reference_groups, require

# --------------------------------------------------------------------------- the quantile it converges to


class _TwoHeads(nn.Module):
    """out_i = w1 . x_i0 + w2 . x_i1: sample i's gradient is x_i0 for w1 and x_i1 for w2, so each layer-wise group's
    per-sample norm is the norm of its half of the input, whose distribution the test sets."""

    def __init__(self, d: int):
        super().__init__()
        self.l1 = nn.Linear(d, 1, bias=False)
        self.l2 = nn.Linear(d, 1, bias=False)

    def forward(self, x):
        return self.l1(x[:, 0]) + self.l2(x[:, 1])


MEDIANS, SPREAD = (1.0, 3.0), 0.5  # group g's norms are lognormal: median MEDIANS[g], log-std SPREAD


def _norm_batch(B: int, d: int, g: torch.Generator) -> torch.Tensor:
    dirs = torch.randn(B, 2, d, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    logs = torch.randn(B, 2, 1, generator=g, dtype=torch.float64) * SPREAD
    return dirs * (logs + torch.tensor(MEDIANS, dtype=torch.float64).log().view(1, 2, 1)).exp()


def _fraction_below(r: float, median: float) -> float:
    """P(n <= r) for the lognormal norms of median ``median``."""
    return float(stats.norm.cdf(math.log(r / median) / SPREAD))


@pytest.mark.parametrize(
    "strategy,noisy,accumulation",
    [("bk", True, 1), ("two-pass", False, 1),
     pytest.param("bk", False, 2, marks=pytest.mark.slow), pytest.param("two-pass", True, 2, marks=pytest.mark.slow)],
)  # fmt: skip
def test_bounds_converge_to_the_target_quantile_of_each_group(strategy, noisy, accumulation):
    """Two groups with stationary norm distributions (medians 1 and 3) and target quantile 0.7: from R = 0.3 (where
    ~0% and ~0% of the norms fit) each bound reaches the 0.7-quantile of its own group.

    Tolerance: linearising log R about its fixed point, one step is an AR(1) with coefficient 1 - eta f
    (f = phi(Phi^-1(0.7)) / 0.5 = 0.70, eta = 0.2: 0.86) driven by eta (b - F(R)), b's std sqrt(0.21 / 64) = 0.057
    from the batch and sigma_b / E = 3 / 64 = 0.047 from the noise: log R then has std 0.029, F(R) 0.02, and the
    average of F(R_t) over the last 100 steps (~14 independent ones) a std of ~0.006. 0.03 is 5 of those. R reaches
    the quantile in ~20 steps (log R moves by up to eta * 0.7 = 0.14 a step while no norm fits)."""
    E, d, gamma = 64, 6, 0.7
    torch.manual_seed(0)
    model = _TwoHeads(d).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    adaptive = dict(target_quantile=gamma, lr=0.2, count_noise_multiplier=3.0 if noisy else 0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=1.0 if noisy else 0.0, max_grad_norm=[0.3, 0.3], expected_batch_size=E,
        groups="layer-wise", strategy=strategy, accumulation_steps=accumulation, adaptive_clipping=adaptive, seed=1,
        loss_reduction="sum",
    )  # fmt: skip
    assert all(_fraction_below(0.3, m) < 0.05 for m in MEDIANS)  # far from the target at the start
    g = torch.Generator().manual_seed(2)
    fractions = []
    for _ in range(150):
        x = _norm_batch(E, d, g)
        for xs in x.tensor_split(accumulation):
            opt.backward(model(xs).sum())
        opt.step()
        opt.zero_grad()
        fractions.append([_fraction_below(r, m) for r, m in zip(opt.max_grad_norm, MEDIANS, strict=True)])
    late = torch.tensor(fractions[50:]).mean(0)
    assert (late - gamma).abs().max() < 0.03, late
    true_quantiles = [m * math.exp(SPREAD * stats.norm.ppf(gamma)) for m in MEDIANS]
    assert opt.max_grad_norm == pytest.approx(true_quantiles, rel=0.15)  # ~2.5 std of log R (0.029 / 0.5 ... )


# --------------------------------------------------------------------------- the same steps as a naive oracle

EBS, ETA, GAMMA = 5.0, 0.5, 0.4
# float64 models and oracle; the engine's norms and sums take other summation orders (see test_modes): 1e-9
TOL = dict(rtol=1e-9, atol=1e-12)


def _oracle_run(case, groups_spec, steps: int, B: int):
    """The naive adaptive run (noise off, sum reduction): per step the float64 per-sample gradients, each group clipped
    by its R_t and summed, and R_{t+1} = R_t exp(-eta (b - gamma)), b = (#{n_i <= R_t} - B/2) / E + 1/2 (the centred
    count: B = 7 != E = 5 here, so an uncentred count fails)."""
    model = case.build()
    groups = reference_groups(model, groups_spec)
    bounds = [0.5 / math.sqrt(len(groups))] * len(groups)
    out = []
    for t in range(steps):
        x, y = batch(case, B, seed=t)
        ps = per_sample_grads(model, case, x, y)
        grads, nxt = {}, []
        for names, R in zip(groups, bounds, strict=True):
            n = torch.stack([ps[k].flatten(1).square().sum(1) for k in names]).sum(0).sqrt()
            c = torch.clamp(R / (n + 1e-6), max=1.0)
            for k in names:
                grads[k] = torch.einsum("b,b...->...", c, ps[k])
            nxt.append(R * math.exp(-ETA * ((float((n <= R).sum()) - B / 2) / EBS + 0.5 - GAMMA)))
        out.append((list(bounds), grads))
        bounds = nxt
    return out


def _engine_run(case, groups_spec, steps: int, B: int, strategy: str, accumulation: int):
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    n_groups = len(reference_groups(model, groups_spec))
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=EBS, groups=groups_spec,
        strategy=strategy, accumulation_steps=accumulation, loss_reduction="sum",
        adaptive_clipping=AdaptiveClipping(count_noise_multiplier=0.0, target_quantile=GAMMA, lr=ETA),
    )  # fmt: skip
    out = []
    for t in range(steps):
        x, y = batch(case, B, seed=t)
        bounds = opt.max_grad_norm
        for xs, ys in zip(x.tensor_split(accumulation), y.tensor_split(accumulation), strict=True):
            opt.backward(batch_loss(case, model(xs), ys, "sum"))
        opt.step()
        out.append(([bounds] if n_groups == 1 else bounds, {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.zero_grad()
    return out


@pytest.mark.parametrize(
    "name,groups,strategy,accumulation,backend",
    [
        ("mlp", "layer-wise", "bk", 1, None),
        ("mlp", "param-wise", "two-pass", 1, None),
        ("mlp", "all-layer", "bk", 2, None),
        ("tied", "layer-wise", "two-pass", 2, None),
        ("conv2d", "layer-wise", "bk", 1, None),
        pytest.param("mlp", "layer-wise", "bk", 1, "triton", marks=pytest.mark.slow),  # the interpreter: ~15 s
        ("mlp", "layer-wise", "two-pass", 1, "cuda"),
    ],
)
def test_adaptive_steps_equal_the_naive_oracle(name, groups, strategy, accumulation, backend):
    """Noise off, 4 steps (3 on Triton) on fresh batches: each step's bounds and clipped sums equal the float64
    per-sample loop's (the bounds move by ~e^(+-0.3) a step, so a count off by one sample or an update a step late
    fails), on every strategy, group mode and backend (the counts are taken in the engine from the norms it clips
    by)."""
    case = BY_NAME[name]
    require(case)
    if backend == "cuda":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
        from _compiled import compiled_backend

        compiled_backend()
    if backend is not None:
        dpkernels.set_backend(backend)
    steps = 3 if backend == "triton" else 4  # the Triton interpreter runs ~4 s a step here
    expected = _oracle_run(case, groups, steps, 7)
    got = _engine_run(case, groups, steps, 7, strategy, accumulation)
    moved = [b for b, _ in expected]
    assert moved[0] != pytest.approx(moved[-1], rel=0.05)  # the bounds really move
    for (eb, eg), (gb, gg) in zip(expected, got, strict=True):
        assert gb == pytest.approx(eb, rel=1e-12)
        for k, v in eg.items():
            torch.testing.assert_close(gg[k], v, **TOL)


# --------------------------------------------------------------------------- sensitivity at every step

SIGMA, SIGMA_B = 1.0, 2.0


def _step(opt, model, case, x, y, t: int, bounds: list[float]):
    """One step of the engine from step t with bounds R_t (noise streams are functions of (seed, t))."""
    eng = opt.engine
    eng.steps = eng.stream = t  # the stream index keys the noise; steps is what is saved
    set_bounds(eng, bounds)
    opt.zero_grad()
    opt.backward(batch_loss(case, model(x), y, "sum"))
    opt.step()
    grad = torch.cat([p.grad.flatten().double() for p in eng._params])
    return grad, eng.adaptive.released.clone()


@pytest.mark.parametrize(
    "name,groups,strategy",
    [("mlp", "all-layer", "bk"), ("mlp", "layer-wise", "two-pass"), ("tied", "layer-wise", "bk"),
     ("conv2d", "param-wise", "bk")],
)  # fmt: skip
def test_each_step_keeps_its_sensitivity_with_the_bound_of_that_step(name, groups, strategy):
    """At each of 4 steps (R_t moving), with the same noise draws (fixed seed, step restored): removing an
    adversarial sample (inputs x 1e4: clipped in each group its gradient reaches) moves the gradient by
    <= R_total,t and each group's count by exactly 1/2 (its norm fits under R_g or not: 1[.] - 1/2 is +-1/2 either
    way), and the pair by at most 1/sigma in units of their noise stds
    (||dg||^2 / (sigma_grad R_t)^2 + ||dc||^2 / sigma_b^2 <= sigma^-2: the Gaussian mechanism that is accounted);
    replacing it by another moves them by <= 2 R_total,t and <= 1. Relative slack 1e-5: the noise (std ~R) is
    added in float32 in both runs, so the difference carries ~1e-7 R per coordinate."""
    case = BY_NAME[name]
    require(case)
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=SIGMA, max_grad_norm=0.5, expected_batch_size=EBS, groups=groups,
        strategy=strategy, loss_reduction="sum", seed=3,
        adaptive_clipping=dict(count_noise_multiplier=SIGMA_B, target_quantile=0.5, lr=0.5),
    )  # fmt: skip
    eng = opt.engine
    G = len(eng.groups)
    sigma_grad = grad_noise_multiplier(SIGMA, SIGMA_B, G)
    seen = []
    for t in range(4):
        x, y = batch(case, 6, seed=10 + t)
        x = x.clone()
        big = x[2] * 1e4 if x.is_floating_point() else x[2]
        x_adv = x.clone()
        if x.is_floating_point():
            x_adv[2] = big
        bounds = list(eng.bounds)
        seen.append(bounds)
        R = math.sqrt(sum(b * b for b in bounds))
        keep = [i for i in range(6) if i != 2]
        g_without, c_without = _step(opt, model, case, x_adv[keep], y[keep], t, bounds)
        x_rep = x_adv.clone()
        x_rep[2] = -big.flip(0) if x.is_floating_point() else x[3]
        g_rep, c_rep = _step(opt, model, case, x_rep, y, t, bounds)
        g_with, c_with = _step(opt, model, case, x_adv, y, t, bounds)  # last: the run goes on from this step
        dg, dc = (g_with - g_without).norm().item(), (c_with - c_without).abs()
        assert dg <= R * (1 + 1e-5)
        assert ((dc - 0.5).abs() < 1e-12).all(), dc  # counted once, in every group (float64 noise ~1: ulps ~1e-15)
        joint = dg**2 / (sigma_grad * R) ** 2 + float(dc.square().sum()) / SIGMA_B**2
        assert joint <= SIGMA**-2 * (1 + 1e-5)
        assert (g_with - g_rep).norm().item() <= 2 * R * (1 + 1e-5)
        assert ((c_with - c_rep).abs() <= 1).all()
        if x.is_floating_point():
            assert dg >= min(bounds) * (1 - 1e-4)  # the sample was there, clipped to R_g in a group at least
    assert seen[0] != pytest.approx(seen[-1], rel=0.05)


# --------------------------------------------------------------------------- the noise

ALPHA = 1e-6  # KS level, as in test_noise_ks


def test_gradient_noise_is_sigma_grad_times_the_bound_of_the_step():
    """Zero output gradients (the clipped sum vanishes, every norm is 0 <= R, so R_t falls every step): each step's
    gradient / (sigma_grad R_t / E) is N(0, 1) by a KS test at level 1e-6 on 4 x 9216 values, and the same values
    read with the overall sigma (sigma_grad / sigma = 1.5 here: sigma_b = 0.67) or with last step's bound are
    rejected (KS distance >= 0.12 against a critical value of 0.01)."""
    sigma, sigma_b, E = 1.0, 0.67, 5.0
    sigma_grad = grad_noise_multiplier(sigma, sigma_b, 1)
    assert sigma_grad == pytest.approx(1.5, rel=0.01)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1024))
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=sigma, max_grad_norm=2.0,
        expected_batch_size=E, seed=5, adaptive_clipping=dict(count_noise_multiplier=sigma_b, lr=1.5),
    )  # fmt: skip
    z, z_sigma, z_stale, bounds = [], [], [], []
    for _ in range(4):
        R = opt.max_grad_norm
        bounds.append(R)
        assert opt.engine.noise_std() == pytest.approx(sigma_grad * R / E, rel=1e-12)
        opt.zero_grad()
        (model(torch.randn(3, 8)) * 0).sum().backward()
        opt.step()
        g = torch.cat([p.grad.flatten().double() for p in model.parameters()])
        z.append(g / (sigma_grad * R / E))
        z_sigma.append(g / (sigma * R / E))
        z_stale.append(g / (sigma_grad * opt.max_grad_norm / E))  # the bound after the update: ~1.6x off
    assert bounds[-1] < 0.5 * bounds[0]  # R_t moved (down: every norm was 0)
    assert stats.kstest(torch.cat(z).numpy(), "norm").pvalue > ALPHA
    assert stats.kstest(torch.cat(z_sigma).numpy(), "norm").pvalue < ALPHA
    assert stats.kstest(torch.cat(z_stale).numpy(), "norm").pvalue < ALPHA


def test_count_noise_is_sigma_b_split_over_the_ranks():
    """The released counts are count + sigma_b / sqrt(W) z: KS at level 1e-6 on 8000 counts per world size, the
    wrong scale (sigma_b for every rank of 4) rejected."""
    for world in (1, 4):
        state = AdaptiveState(AdaptiveClipping(count_noise_multiplier=2.5), 8000)
        state._count = torch.full((8000,), 3.5, dtype=torch.float64)
        eng = SimpleNamespace(world_size=world, _params=[torch.zeros(1)], secure=None, stream=0, steps=0, rank=0)
        c = state.release(eng, seed=11)
        z = ((c - 3.5) / (2.5 / math.sqrt(world))).numpy()
        assert stats.kstest(z, "norm").pvalue > ALPHA
        if world > 1:
            assert stats.kstest(z * math.sqrt(world), "norm").pvalue < ALPHA


# --------------------------------------------------------------------------- the account


def test_epsilon_is_that_of_plain_dp_sgd_at_the_overall_noise_multiplier():
    """target_epsilon calibrates the overall sigma (before adaptive clipping is attached, as without it); the gradient
    gets sigma_grad = (sigma^-2 - G (2 sigma_b)^-2)^-1/2 (G = 2 layer-wise groups here), and the accountant's epsilon
    after the steps is plain DP-SGD's at sigma, within the target."""
    q, steps, delta, sigma_b = 0.05, 12, 1e-5, 4.0
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_epsilon=2.0, target_delta=delta,
        sample_rate=q, expected_batch_size=8, steps=steps, groups="layer-wise",
        adaptive_clipping=dict(count_noise_multiplier=sigma_b),
    )  # fmt: skip
    for _ in range(steps):
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    sigma = opt.engine.noise_multiplier
    assert opt.engine.grad_noise_multiplier == pytest.approx((sigma**-2 - 2 / (2 * sigma_b) ** 2) ** -0.5, rel=1e-12)
    assert opt.engine.grad_noise_multiplier > sigma
    eps = opt.accountant.get_epsilon(delta)
    assert eps == pytest.approx(dpkernels.get_epsilon(sigma, q, steps, delta), rel=1e-12)
    assert 1.9 < eps <= 2.0 + 1e-9  # calibrated to the target: the counts' share is inside it, not on top


# --------------------------------------------------------------------------- refusals, syncs, secrets


def _private(**adaptive):
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    return dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, expected_batch_size=8,
        groups="param-wise", adaptive_clipping=adaptive,
    )  # fmt: skip


@pytest.mark.parametrize(
    "adaptive,match",
    [
        (
            dict(count_noise_multiplier=0.99),
            r"count_noise_multiplier=0.99 is too small.*4 clipping group.*sqrt\(G\) sigma / 2 = 1\b",
        ),
        (dict(count_noise_multiplier=0.0), r"too small"),
        (dict(count_noise_multiplier=5.0, target_quantile=1.0), r"target_quantile must be in \(0, 1\)"),
        (dict(count_noise_multiplier=5.0, lr=0.0), r"lr must be a finite number > 0"),
        (dict(count_noise_multiplier=-1.0), r"count_noise_multiplier must be a finite number >= 0"),
        (dict(count_noise_multiplier=5.0, quantile=0.5), r"unknown setting\(s\) \['quantile'\]"),
        (dict(target_quantile=0.5), r"needs count_noise_multiplier"),
    ],
)
def test_refusals(adaptive, match):
    with pytest.raises(ValueError, match=match):
        _private(**adaptive)


def test_not_a_dict_is_refused():
    model = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="AdaptiveClipping or a dict"):
        dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, expected_batch_size=8,
            adaptive_clipping=0.5,
        )  # fmt: skip


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
def test_the_counts_cost_one_read_per_step(strategy):
    """The indicators and their sums stay on the device: a step reads at most one flag per backward pass (as
    without adaptive clipping) plus the G noisy counts once, at the step."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, expected_batch_size=8,
        groups="param-wise", strategy=strategy, adaptive_clipping=dict(count_noise_multiplier=5.0),
    )  # fmt: skip
    x = torch.randn(8, 4)
    for _ in range(2):  # count the second step
        counter = SyncCounter()
        with counter:
            opt.backward(model(x).square().mean())
            opt.step()
            opt.zero_grad()
    passes = 2 if strategy == "two-pass" else 1
    assert sum(counter.syncs.values()) <= passes + 1, dict(counter.syncs)


def test_a_failed_pass_leaves_no_count_behind():
    """A backward that fails (a non-finite norm) takes no step and adds nothing to the count: the next step's count
    is that of its own batch only (noise off: exactly B/2 - #clipped ... here every norm is below R: +1/2 each)."""
    model = nn.Sequential(nn.Linear(4, 2))
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=1e6,
        expected_batch_size=4, adaptive_clipping=dict(count_noise_multiplier=0.0),
    )  # fmt: skip
    bad = torch.randn(3, 4)
    bad[1] = float("inf")
    with pytest.raises(FloatingPointError):
        model(bad).sum().backward()
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    assert opt.engine.adaptive.released.tolist() == [2.0]


def test_state_dict_holds_the_bounds_and_no_count():
    """The saved optimizer state has the steps, the account and the current bounds (DP outputs), nothing of the raw
    counts; a run resumed from it goes on from those bounds; a copy's engine is detached; bad bounds are refused."""
    import copy

    model, opt = _private(count_noise_multiplier=5.0)
    for _ in range(3):
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    assert set(state["dpkernels"]) == {"run", "steps", "accountant", "adaptive_bounds"}  # run: a public name
    assert state["dpkernels"]["adaptive_bounds"] == opt.max_grad_norm != [0.5] * 4  # moved from 1 / sqrt(4)
    _, fresh = _private(count_noise_multiplier=5.0)
    fresh.load_state_dict(state)
    assert fresh.max_grad_norm == opt.max_grad_norm
    assert fresh.engine.r_total == pytest.approx(opt.engine.r_total, rel=1e-15)
    bad = copy.deepcopy(state)
    bad["dpkernels"]["adaptive_bounds"] = [1.0, -1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="4 finite positive numbers"):
        fresh.load_state_dict(bad)
    clone = copy.deepcopy(opt)
    with pytest.raises(RuntimeError, match="copied"):
        clone.step()
