"""The privacy invariants of a DP step (docs/design.md, section 9).

- sensitivity: removing one example moves the noiseless update by at most R_total / expected_batch_size;
- noise: N(0, (sigma R_total / expected_batch_size)^2) on every coordinate of every parameter, embedding
  rows the batch never touched included; fresh per step and per parameter, reproducible from the seed;
- an empty batch is a valid step (noise only);
- a run resumed from the optimizer's state_dict continues the noise streams and the privacy account;
- a non-finite per-sample gradient (from the loss or from any layer) raises FloatingPointError and leaves
  the gradients and the accumulated micro-batches as they were; so does any error in backward.

Statistical thresholds: every check of a random quantity uses a two-sided test at level ALPHA = 1e-6.
The noise comes from fixed seeds, so each test is deterministic; the level bounds the chance that a
correct engine would fail for some seed (the seeds are not tuned).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

import dpkernels

from .zoo import (
    BY_NAME,
    CASES,
    Case,
    batch,
    batch_loss,
    flat,
    group_norms,
    per_sample_grads,
    reference_groups,
    require,
    trainable,
)

ALPHA = 1e-6


def _make(case: Case, **kw) -> tuple[nn.Module, dpkernels.DPOptimizer]:
    model = case.build()
    kw.setdefault("expected_batch_size", 4.0)
    model, opt = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), **kw)
    return model, opt


def _step(case: Case, model, opt, x, y, reduction="mean", strategy="bk") -> dict[str, torch.Tensor]:
    opt.zero_grad()
    loss = batch_loss(case, model(x), y, reduction)
    if strategy == "two-pass":
        opt.backward(loss)
    else:
        loss.backward()
    opt.step()
    return {n: p.grad.detach().clone() for n, p in trainable(model).items()}


# --------------------------------------------------------------------------------------- sensitivity

SENS_MODES = [
    ("all-layer", "abadi", "bk"),
    ("layer-wise", "automatic", "bk"),
    ("param-wise", "abadi", "two-pass"),
    ("layer-wise", "abadi", "two-pass"),
    ("all-layer", "automatic", "two-pass"),
    ("param-wise", "automatic", "bk"),
]


def _sens_params():
    for case in CASES:
        for i, mode in enumerate(SENS_MODES):
            yield pytest.param(
                case, *mode, marks=[] if i < 3 else [pytest.mark.slow], id=f"{case.name}-{'-'.join(mode)}"
            )


@pytest.mark.parametrize("case,groups,clipping,strategy", list(_sens_params()))
def test_removing_one_example_moves_update_by_at_most_r_total(case, groups, clipping, strategy):
    require(case)
    B, ebs = 4, 3.0
    x, y = batch(case, B, seed=1)
    ps = per_sample_grads(case.build(), case, x, y)
    G = len(reference_groups(case.build(), groups))
    norms = group_norms(ps, reference_groups(case.build(), groups))
    assert float(norms.min()) > 0
    # every sample is clipped in every group: each group bound R/sqrt(G) is half the smallest norm
    R = 0.5 * math.sqrt(G) * float(norms.min())
    model, opt = _make(
        case, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=ebs, groups=groups, clipping=clipping,
        strategy=strategy,
    )  # fmt: skip
    full = flat(_step(case, model, opt, x, y, strategy=strategy))
    # the first sample, and the one with the largest gradient (where an under-estimated norm shows most)
    for j in sorted({0, int(norms.square().sum(0).argmax())}):
        keep = [i for i in range(B) if i != j]
        d = float((full - flat(_step(case, model, opt, x[keep], y[keep], strategy=strategy))).norm())
        # the bound itself, up to float64 rounding of sums of a few hundred terms (1e-12 relative)
        assert d <= R / ebs * (1 + 1e-12), f"sample {j}: {d} > R_total/ebs = {R / ebs}"
        if clipping == "abadi":
            # clipping is active, so one sample moves the update by R n/(n + 1e-6) ~ R (n >= 1e-3 here):
            # the bound is tight, and a norm over-estimate (clipping too much) is caught too
            assert d >= R / ebs * (1 - 1e-3), f"sample {j}: {d} << R_total/ebs = {R / ebs}: clipping not active?"


# --------------------------------------------------------------------------------------- noise


def _bounds(model: nn.Module) -> list[float]:
    """Layer-wise bounds 0.5, 0.75, 1.0, ...: R_total = sqrt(sum R_g^2) differs from every R_g."""
    return [0.5 + 0.25 * k for k in range(len(reference_groups(model, "layer-wise")))]


def _chi2_ok(z: torch.Tensor, std: float) -> tuple[bool, str]:
    """sum z^2 / std^2 ~ chi2(n) for n iid N(0, std^2) values; and mean ~ N(0, std^2 / n)."""
    n = z.numel()
    s = float(z.double().square().sum()) / std**2
    lo, hi = stats.chi2.ppf(ALPHA / 2, n), stats.chi2.isf(ALPHA / 2, n)
    m = float(z.double().mean())
    zcrit = stats.norm.isf(ALPHA / 2)
    ok = lo <= s <= hi and abs(m) <= zcrit * std / math.sqrt(n)
    return (
        ok,
        f"n={n}: empirical std {math.sqrt(s / n) * std:.4g} vs {std:.4g} "
        f"(ok range x[{math.sqrt(lo / n):.3f}, {math.sqrt(hi / n):.3f}]), mean {m:.3g}",
    )


def _noise_samples(case: Case, steps: int, reduction: str, sigma: float, ebs: float, B: int = 6):
    """(noise per parameter stacked over steps, noiseless update, expected std) on a real batch."""
    x, y = batch(case, B, seed=2)
    model, opt = _make(case, noise_multiplier=0.0, max_grad_norm=_bounds(case.build()), groups="layer-wise",
                       expected_batch_size=ebs, loss_reduction=reduction)  # fmt: skip
    clean = _step(case, model, opt, x, y, reduction)
    model, opt = _make(case, noise_multiplier=sigma, max_grad_norm=_bounds(case.build()), groups="layer-wise",
                       expected_batch_size=ebs, loss_reduction=reduction, seed=123)  # fmt: skip
    noise = {n: [] for n in clean}
    for _ in range(steps):
        for n, g in _step(case, model, opt, x, y, reduction).items():
            noise[n].append(g - clean[n])
    r_total = math.sqrt(sum(b * b for b in _bounds(model)))
    assert opt.engine.r_total == pytest.approx(r_total, rel=1e-15)
    std = sigma * r_total / (ebs if reduction == "mean" else 1.0)
    return {n: torch.stack(v) for n, v in noise.items()}, clean, std


def _noise_params():
    for case in CASES:
        for reduction in ("mean", "sum"):
            marks = [] if reduction == "mean" or case.name == "mlp" else [pytest.mark.slow]
            yield pytest.param(case, reduction, marks=marks, id=f"{case.name}-{reduction}")


@pytest.mark.parametrize("case,reduction", list(_noise_params()))
def test_noise_std_is_sigma_r_total_over_expected_batch_size(case, reduction):
    require(case)
    # B = 6 != ebs = 3: noise scaled by the realised batch size is off by 2x in std. 8 steps give every
    # parameter >= 32 noise values (the head bias has OUT = 4): at ALPHA the per-parameter std is then
    # pinned to about [0.5, 1.6]x, so a factor 2 on any one parameter fails; the pooled one (thousands
    # of values) to a few percent.
    noise, clean, std = _noise_samples(case, steps=8, reduction=reduction, sigma=1.3, ebs=3.0)
    for n, z in noise.items():
        ok, msg = _chi2_ok(z, std)
        assert ok, f"{n}: {msg}"
    ok, msg = _chi2_ok(torch.cat([z.flatten() for z in noise.values()]), std)
    assert ok, f"all parameters pooled: {msg}"


def test_noise_on_embedding_rows_the_batch_never_touches():
    case = BY_NAME["embedding"]
    require(case)
    noise, clean, std = _noise_samples(case, steps=8, reduction="mean", sigma=1.3, ebs=3.0)
    x, _ = batch(case, 6, seed=2)
    untouched = sorted(set(range(20)) - set(x.flatten().tolist())) + [0]  # + the padding row
    assert len(untouched) >= 9  # tokens come from [0, 12): rows 12..19 at least
    assert torch.equal(clean["0.weight"][untouched], torch.zeros_like(clean["0.weight"][untouched]))
    ok, msg = _chi2_ok(noise["0.weight"][:, untouched], std)  # >= 9 rows x 8 x 8 steps = 576 values
    assert ok, f"untouched rows: {msg}"


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.numel(), b.numel())
    a, b = a.flatten()[:n].double(), b.flatten()[:n].double()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_noise_is_fresh_per_step_and_parameter_and_reproducible_from_the_seed():
    case = BY_NAME["mlp"]
    n1, clean, _ = _noise_samples(case, steps=2, reduction="mean", sigma=1.0, ebs=3.0)
    n2, _, _ = _noise_samples(case, steps=2, reduction="mean", sigma=1.0, ebs=3.0)
    for n in n1:
        assert torch.equal(n1[n], n2[n]), f"{n}: same seed, different noise"
    # Reused noise gives |corr| = 1. For independent N(0,1) vectors of length n, |corr| > 0.999 has
    # probability < 1e-3 at n = 4 (the smallest parameter, OUT values) and far less for larger n; the
    # weights (n >= 24) are held to 0.9, which independent noise exceeds with probability < 1e-8
    # (r^2 ~ Beta(1/2, (n-1)/2)).
    for n, z in n1.items():
        lim = 0.999 if z[0].numel() < 24 else 0.9
        assert abs(_corr(z[0], z[1])) < lim, f"{n}: same noise at two steps"
    names = [n for n in n1 if n1[n][0].numel() >= 24]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert abs(_corr(n1[a][0], n1[b][0])) < 0.9, f"{a} and {b} share noise"
    # another seed, other noise
    x, y = batch(case, 6, seed=2)
    model, opt = _make(case, noise_multiplier=1.0, max_grad_norm=_bounds(case.build()), groups="layer-wise",
                       expected_batch_size=3.0, seed=124)  # fmt: skip
    other = _step(case, model, opt, x, y)
    assert abs(_corr(other["0.weight"] - clean["0.weight"], n1["0.weight"][0])) < 0.9


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_empty_batch_step_is_noise_only(name, strategy):
    case = BY_NAME[name]
    require(case)
    x, y = batch(case, 0)
    model, opt = _make(case, noise_multiplier=0.0, max_grad_norm=1.0, strategy=strategy)
    clean = _step(case, model, opt, x, y, strategy=strategy)
    for n, g in clean.items():
        assert torch.equal(g, torch.zeros_like(g)), f"{n}: an empty batch moved the noiseless update"
    model, opt = _make(case, noise_multiplier=2.0, max_grad_norm=1.0, strategy=strategy, seed=7)
    noise = torch.cat(
        [g.flatten() for _ in range(4) for g in _step(case, model, opt, x, y, strategy=strategy).values()]
    )
    ok, msg = _chi2_ok(noise, 2.0 * 1.0 / 4.0)  # sigma R_total / expected_batch_size; >= 4 x 60 values
    assert ok, msg


def test_resumed_run_continues_the_noise_streams_and_the_account():
    """A run resumed from DPOptimizer.state_dict() (through torch.save) takes the step the uninterrupted
    run would have taken, noise included: with a fixed seed the streams are functions of the step, and a
    resumed run restarting at step 0 would repeat earlier noise, which subtracting two updates removes.
    Its accountant has counted every step."""
    import io

    case = BY_NAME["mlp"]

    def make():
        model = case.build()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        kw = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0, sample_rate=0.01, seed=7)
        return dpkernels.make_private(model, opt, **kw)

    def step(model, opt, k):
        x, y = batch(case, 4, seed=k)
        opt.zero_grad()
        batch_loss(case, model(x), y, "mean").backward()
        opt.step()
        return {n: p.grad.clone() for n, p in trainable(model).items()}

    model, opt = make()
    straight = [step(model, opt, k) for k in range(4)]
    model, opt = make()
    for k in range(3):
        step(model, opt, k)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert "seed" not in str(saved["opt"]["dpkernels"])  # the noise seed is never written out
    model2, opt2 = make()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    resumed = step(model2, opt2, 3)
    for n in resumed:
        torch.testing.assert_close(resumed[n], straight[3][n], rtol=0, atol=0)  # the same step, same noise
        assert not torch.allclose(resumed[n], straight[0][n])
    assert opt2.accountant.steps == opt.accountant.steps + 1 == 4
    model3, opt3 = make()
    with pytest.warns(UserWarning, match="no dpkernels entry"):
        opt3.load_state_dict(torch.optim.SGD(model3.parameters(), lr=0.05).state_dict())


# --------------------------------------------------------------------------------------- non-finite


def _nonfinite_params():
    modes = [("all-layer", "bk"), ("layer-wise", "bk"), ("param-wise", "bk"), ("all-layer", "two-pass")]
    for case in CASES:  # every mode on the MLP, one per other layer type
        for i, (groups, strategy) in enumerate(modes):
            for bad in ("nan", "inf"):
                if case.name == "mlp" or (i, bad) in {(0, "inf"), (1, "nan")}:
                    yield pytest.param(case, float(bad), groups, strategy, id=f"{case.name}-{groups}-{strategy}-{bad}")


@pytest.mark.parametrize("case,bad,groups,strategy", list(_nonfinite_params()))
def test_non_finite_sample_raises_and_leaves_gradients_untouched(case, bad, groups, strategy):
    require(case)
    x, y = batch(case, 5)
    model, opt = _make(case, noise_multiplier=0.5, max_grad_norm=1.0, groups=groups, strategy=strategy, seed=3)
    sentinel = {n: torch.full_like(p, 7.0) for n, p in trainable(model).items()}
    for n, p in trainable(model).items():
        p.grad = sentinel[n].clone()
    per = case.loss(model(x), y)
    poison = torch.ones_like(per)
    poison[2] = bad
    with pytest.raises(FloatingPointError, match=r"sample\(s\) \[2\]"):
        opt.backward((per * poison).mean())
    for n, p in trainable(model).items():
        assert torch.equal(p.grad, sentinel[n]), f"{n}: gradient changed by a failed step"
    # the engine is not left half-way: the next clean step equals one on a fresh engine
    opt.zero_grad()
    after = _step(case, model, opt, x, y, strategy=strategy)
    model2, opt2 = _make(case, noise_multiplier=0.5, max_grad_norm=1.0, groups=groups, strategy=strategy, seed=3)
    fresh = _step(case, model2, opt2, x, y, strategy=strategy)
    for n in after:
        torch.testing.assert_close(after[n], fresh[n], rtol=0, atol=0)  # same computation, same seed and step


class _Poison(torch.autograd.Function):
    """Identity forward; backward poisons sample 2's gradient, or raises, from here down the network."""

    @staticmethod
    def forward(ctx, x, mode):
        ctx.mode = mode
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.mode == "raise":
            raise RuntimeError("a non-DP layer failed in backward")
        g = g.clone()
        g[2] = float("nan")
        return g, None


class _PoisonedMLP(nn.Module):
    """Linear -> Tanh -> poison -> Linear: the last layer's norms are finite, the first layer's are not."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.mode: str | None = None

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(_Poison.apply(h, self.mode) if self.mode else h)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
@pytest.mark.parametrize("mode", ["nan", "raise"])
@pytest.mark.parametrize("groups", ["layer-wise", "param-wise"])
def test_failure_in_a_lower_layer_writes_nothing(groups, mode, accumulation_steps):
    """With several groups the last layer's group is finished (clipped, summed, noised) before the first
    layer's norms exist. A NaN there (FloatingPointError) or an error in a non-DP layer's backward must
    leave .grad and the accumulated micro-batches as they were, and the next step must equal a fresh one."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def make():
        torch.manual_seed(1)
        model = _PoisonedMLP()
        kw = dict(noise_multiplier=0.5, max_grad_norm=1.0, groups=groups, seed=3, expected_batch_size=4.0)
        return dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.0), **kw, accumulation_steps=accumulation_steps
        )

    def step(model, opt, fail: bool):
        opt.zero_grad()
        for k in range(accumulation_steps):
            if fail and k == accumulation_steps - 1:
                model.mode = mode
                sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
                for n, p in model.named_parameters():
                    p.grad = sentinel[n].clone()
                err = FloatingPointError if mode == "nan" else RuntimeError
                with pytest.raises(err, match=r"sample\(s\) \[2\]" if mode == "nan" else "non-DP layer"):
                    nn.functional.cross_entropy(model(x), y).backward()
                for n, p in model.named_parameters():
                    assert torch.equal(p.grad, sentinel[n]), f"{n}: gradient changed by a failed backward"
                model.mode = None
                for p in model.parameters():
                    p.grad = None
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    failed = step(*make(), fail=True)
    fresh = step(*make(), fail=False)
    for n in fresh:
        torch.testing.assert_close(failed[n], fresh[n], rtol=0, atol=0)  # same computation, seed and step
