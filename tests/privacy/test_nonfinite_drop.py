"""make_private(..., nonfinite="drop"): a sample whose per-sample gradient is non-finite gets clip factor 0 and the
step goes on, equal to the step without that sample given the same noise; nonfinite="raise" (the default) still
raises with no step.

Why "drop" is the DP-safe choice: under "raise" whether a step happens depends on one sample (an adversary whose
sample overflows learns from the failed step whether it was drawn). Under "drop" the released update with the
sample is the update without it, the neighbouring dataset's: the tests check exactly that, with noise on
(the noise is keyed by the seed, the step and the parameter, not by the batch, so both runs draw the same z).

Tolerance: the two runs sum the same non-zero terms (the dropped sample adds exact zeros) but over batches of
different sizes, so a matrix product may block its reduction differently; in float64 each result is within
n u sum|terms| of the exact sum (n <= 64 terms, u = 2^-53), far below rtol = atol = 1e-10 for terms of size <= 10.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkernels

INF, NAN = float("inf"), float("nan")
BAD = 2
TOL = dict(rtol=1e-10, atol=1e-10)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.n = nn.GroupNorm(2, 4)
        self.h = nn.Linear(4 * 5 * 5, 2)

    def forward(self, x):
        return self.h(self.n(self.c(x)).flatten(1))


class _Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(11, 4, padding_idx=0)
        self.ln = nn.LayerNorm(4)
        self.h = nn.Linear(4, 2)

    def forward(self, ids):
        return self.h(self.ln(self.e(ids))).mean(1)


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.h = nn.Linear(4, 2)

    def forward(self, x):
        y, _ = self.att(x, x, x, need_weights=False)
        return self.h(y).mean(1)


class _Tied(nn.Module):
    """An embedding tied to its output head: the tie's exact norm has the cross term."""

    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(11, 4)
        self.h = nn.Linear(4, 11, bias=False)
        self.h.weight = self.e.weight

    def forward(self, ids):
        return self.h(torch.tanh(self.e(ids))).mean(1)


class _LSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.h = nn.Linear(5, 2)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.h(y).mean(1)


class _Tapped(nn.Module):
    """A position table broadcast over the batch (a parameter tap, dpkernels.nn.tap) before a Linear."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 3, 4))
        self.h = nn.Linear(4, 2)

    def forward(self, x):
        return self.h(x + self.pos).mean(1)


def _tapped():
    from dpkernels.nn.tap import tap_parameters

    model = _Tapped()
    tap_parameters(model, ["pos"])
    return model


def _data(kind: str):
    g = torch.Generator().manual_seed(7)
    if kind == "mlp":
        return _MLP, torch.randn(4, 4, generator=g, dtype=torch.float64)
    if kind == "conv+groupnorm":
        return _Conv, torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)
    if kind == "embedding+layernorm":
        return _Emb, torch.randint(1, 11, (4, 6), generator=g)
    if kind == "tied-embedding-head":
        return _Tied, torch.randint(0, 11, (4, 6), generator=g)
    if kind == "tap":
        return _tapped, torch.randn(4, 3, 4, generator=g, dtype=torch.float64)
    if kind == "lstm":
        return _LSTM, torch.randn(4, 3, 4, generator=g, dtype=torch.float64)
    return _MHA, torch.randn(4, 3, 4, generator=g, dtype=torch.float64)


def _grads(
    make, x, *, bad: str | None = None, value: float = INF, keep=None, backend="reference", **kw
) -> list[torch.Tensor]:
    """One DP step's gradients (noise on, a fixed seed). ``bad``: how sample BAD is made non-finite ("input": one
    entry of its input; "loss": its per-sample loss times ``value``). ``keep``: the samples the batch holds."""
    torch.manual_seed(0)
    model = make().double()
    settings = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0, seed=3, nonfinite="drop")
    settings.update(kw)
    model, opt = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), backend=backend, **settings)
    x = x.clone()
    w = torch.ones(x.shape[0], dtype=torch.float64)
    if bad == "input":
        x.view(x.shape[0], -1)[BAD, 0] = value
    elif bad == "loss":
        w[BAD] = value
    if keep is not None:
        x, w = x[keep], w[keep]
    steps = kw.get("accumulation_steps", 1)
    for _ in range(steps):
        losses = model(x).square().sum(1) * w  # (B,) per-sample losses: G rows independent of the batch size
        opt.backward(losses)
    opt.step()
    dropped = opt.engine.dropped_samples()
    out = [p.grad.clone() for p in model.parameters()]
    assert dropped == (steps if bad is not None and (keep is None or BAD in keep) else 0), dropped
    return out


WITHOUT = [0, 1, 3]


def _assert_same(got, want, what):
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.isfinite(a).all(), f"{what}: parameter {k} is not finite"
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}, parameter {k}: {m}")


@pytest.mark.parametrize("value", [INF, NAN], ids=["inf", "nan"])
@pytest.mark.parametrize("bad", ["input", "loss"])
@pytest.mark.parametrize(
    "kind", ["mlp", "conv+groupnorm", "embedding+layernorm", "tied-embedding-head", "mha", "lstm", "tap"]
)
def test_the_step_with_a_non_finite_sample_is_the_step_without_it(kind, bad, value):
    make, x = _data(kind)
    if kind in ("embedding+layernorm", "tied-embedding-head") and bad == "input":
        pytest.skip("token ids cannot be non-finite: the embedding's samples go bad through the loss")
    _assert_same(_grads(make, x, bad=bad, value=value), _grads(make, x, keep=WITHOUT), f"{kind}, {bad} = {value}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["mlp", "conv+groupnorm", "embedding+layernorm", "tied-embedding-head"])
def test_each_backend_drops_the_sample(kind, backend):
    """The Triton (interpreter) and compiled backends serve the norms and the clipped sums here."""
    if backend not in dpkernels.ops.available_backends():
        pytest.skip(f"backend {backend} unavailable here")
    make, x = _data(kind)
    bad = "loss" if kind in ("embedding+layernorm", "tied-embedding-head") else "input"
    got = _grads(make, x, bad=bad, backend=backend)
    assert dpkernels.ops.last_backend.get("linear_clipped_sum") == backend
    _assert_same(got, _grads(make, x, keep=WITHOUT, backend=backend), f"{kind} on {backend}")


@pytest.mark.parametrize(
    "kw",
    [
        dict(strategy="two-pass"),
        dict(accumulation_steps=2),
        dict(groups="layer-wise", max_grad_norm=[1.0, 0.5]),
        dict(clipping="automatic"),
        dict(loss_scale=8.0),
    ],
    ids=["two-pass", "accumulation", "layer-wise", "automatic", "loss-scale"],
)
def test_drop_with_each_engine_mode(kw):
    """A non-finite loss: every group of the sample goes non-finite (an input one would not reach b's group:
    tanh(inf) = 1; test_other_clipping_groups_keep_the_sample covers that)."""
    make, x = _data("mlp")
    _assert_same(_grads(make, x, bad="loss", **kw), _grads(make, x, keep=WITHOUT, **kw), str(kw))


class _SideInput(nn.Module):
    """b sees a's output and a side input z: z non-finite makes b's per-sample gradient non-finite while a's,
    through a loss linear in b's output, stays finite."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(4, 1)

    def forward(self, xz):
        return self.b(torch.cat([self.a(xz[:, :3]), xz[:, 3:]], 1))


def test_other_clipping_groups_keep_the_sample():
    """Group-wise clipping: the sample is dropped from b's group only; a's group still sums it."""
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kw = dict(groups="layer-wise", max_grad_norm=[1.0, 1.0], nonfinite="drop", noise_multiplier=1.0, seed=3)

    def run(xz, keep=None):
        torch.manual_seed(0)
        model = _SideInput().double()
        model, opt = dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.0), expected_batch_size=4.0, **kw
        )
        xz = xz if keep is None else xz[keep]
        opt.backward(model(xz).sum(1))  # linear in b's output: b's G is 1, finite, for every sample
        opt.step()
        return [p.grad.clone() for p in model.a.parameters()], [p.grad.clone() for p in model.b.parameters()], opt

    bad = x.clone()
    bad[BAD, 4] = INF
    finite = x.clone()
    finite[BAD, 4] = 0.0
    a_bad, b_bad, opt = run(bad)
    assert opt.engine.dropped_samples() == 1
    a_fin, _, _ = run(finite)
    _, b_without, _ = run(x, keep=WITHOUT)
    for got, want in zip(a_bad, a_fin, strict=True):  # a's inputs are the same in both runs: bit for bit
        assert torch.equal(got, want)
    _assert_same(b_bad, b_without, "b")


def test_drop_with_secure_noise():
    """Secure mode (OS-keyed noise, no seed): with sigma = 0 the step is the one without the sample."""
    make, x = _data("mlp")
    _assert_same(
        _grads(make, x, bad="input", secure_mode=True, seed=None, noise_multiplier=0.0),
        _grads(make, x, keep=WITHOUT, secure_mode=True, seed=None, noise_multiplier=0.0),
        "secure",
    )


def test_drop_with_adaptive_clipping():
    """Adaptive clipping: the step is the one without the sample; its count term is that of a norm above the
    bound (-1/2), so the bounds stay finite and move as usual."""
    make, x = _data("mlp")
    ad = dict(adaptive_clipping=dict(count_noise_multiplier=1.0, target_quantile=0.5, lr=0.2))
    _assert_same(_grads(make, x, bad="input", **ad), _grads(make, x, keep=WITHOUT, **ad), "adaptive")
    torch.manual_seed(0)
    model = make().double()
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4.0, seed=3, nonfinite="drop", **ad,
    )  # fmt: skip
    xb = x.clone()
    xb[BAD, 0] = NAN
    opt.backward(model(xb).square().sum(1))
    opt.step()
    assert 0 < opt.max_grad_norm < float("inf") and opt.max_grad_norm != 1.0, opt.max_grad_norm


def test_drop_with_a_padded_batch():
    """Padding rows (c_i = 0 by the sample mask) and a dropped sample together; the padding is not counted."""
    make, x = _data("mlp")
    torch.manual_seed(0)
    model = make().double()
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4.0, seed=3, nonfinite="drop",
    )  # fmt: skip
    xb = torch.cat([x, torch.full((2, 4), NAN, dtype=torch.float64)])  # two padding rows, non-finite themselves
    xb[BAD, 0] = INF
    mask = torch.tensor([True] * 4 + [False] * 2)
    opt.backward(model(xb).square().sum(1), sample_mask=mask)
    opt.step()
    assert opt.engine.dropped_samples() == 1
    _assert_same([p.grad for p in model.parameters()], _grads(make, x, keep=WITHOUT), "padded")


def test_the_step_is_accounted_as_usual():
    """A step with a dropped sample is a step of the mechanism: the accountant counts it, once, with the run's
    sigma and sampling rate; the engine's step counter (which keys the noise streams) moves as usual."""
    make, x = _data("mlp")
    torch.manual_seed(0)
    model = make().double()
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4.0, sample_rate=0.01, seed=3, nonfinite="drop",
    )  # fmt: skip
    xb = x.clone()
    xb[BAD, 0] = NAN
    for _ in range(2):
        opt.backward(model(xb).square().sum(1))
        opt.step()
    assert opt.accountant.history == [(1.0, 0.01, 2)] and opt.engine.steps == 2
    assert opt.engine.dropped_samples() == 2


def test_raise_still_raises_with_no_step():
    make, x = _data("mlp")
    torch.manual_seed(0)
    model = make().double()
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4.0, seed=3,
    )  # fmt: skip
    xb = x.clone()
    xb[BAD, 0] = INF
    with pytest.raises(FloatingPointError, match=r"sample\(s\) \[2\].*nonfinite='drop'"):
        opt.backward(model(xb).square().sum(1))
    assert all(p.grad is None for p in model.parameters())
    assert opt.engine.dropped_samples() == 0


def test_the_option_is_validated():
    model = _MLP()
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('raise', 'drop'\).*got 'skip'"):
        dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, expected_batch_size=4.0,
            nonfinite="skip",
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"nonfinite='drop' with perturb_k is not supported"):
        dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, expected_batch_size=4.0,
            nonfinite="drop", perturb_k=0.1,
        )  # fmt: skip
