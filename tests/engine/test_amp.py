"""Mixed precision: torch.amp.GradScaler is refused at the step (its scale reaches the clipping, and its
skipped steps would depend on the batch); a fixed loss scale (make_private(loss_scale=S)) is divided out
before clipping, so the bound R applies to the unscaled per-sample gradients and the noise keeps its scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkernels

from .zoo import BY_NAME, batch, batch_loss, per_sample_grads, reference_update

CASE = BY_NAME["mlp"]
B, EBS = 5, 4.0


def _private(loss_scale: float = 1.0, noise: float = 0.0, R: float = 1.0, reduction: str = "mean"):
    model = CASE.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(noise_multiplier=noise, max_grad_norm=R, expected_batch_size=EBS, loss_reduction=reduction)
    return dpkernels.make_private(model, opt, seed=0, loss_scale=loss_scale, **kw)


@pytest.mark.parametrize("b", [B, 0], ids=["batch", "empty-batch"])
def test_grad_scaler_is_refused_and_no_step_is_taken(b):
    model, opt = _private(noise=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batch(CASE, b)
    scaler.scale(batch_loss(CASE, model(x), y, "mean")).backward()
    with pytest.raises(RuntimeError, match=r"no step was taken: torch\.amp\.GradScaler.*bfloat16.*loss_scale=S"):
        scaler.step(opt)
    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), before))
    assert "grad_scale" not in vars(opt) and "found_inf" not in vars(opt)  # a later plain step is not refused


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_fixed_loss_scale_is_divided_out_before_clipping(reduction):
    """(S * loss).backward() with loss_scale=S: the noiseless update is sum_i c_i g_i with c_i from the unscaled
    g_i (float64 oracle), and with noise it equals the unscaled run bit for bit (S a power of two: every
    scaling by S is exact in binary floating point)."""
    x, y = batch(CASE, B)
    ps = per_sample_grads(CASE.build(), CASE, x, y)
    R = float(torch.cat([g.flatten(1) for g in ps.values()], 1).norm(dim=1).median())  # about half clipped
    want = reference_update(ps, [list(ps)], [R], "abadi", EBS if reduction == "mean" else 1.0)
    S = 2.0**10
    grads = {}
    for scale, noise in [(S, 0.0), (S, 1.0), (1.0, 1.0)]:
        model, opt = _private(scale, noise=noise, R=R, reduction=reduction)
        (scale * batch_loss(CASE, model(x), y, reduction)).backward()
        grads[scale, noise] = {n: p.grad.clone() for n, p in model.named_parameters()}
    # float64; the engine's norms take other summation orders than the oracle (< 1e-13 relative here)
    for n, g in want.items():
        torch.testing.assert_close(grads[S, 0.0][n], g, rtol=1e-9, atol=1e-12)
    for n in want:
        torch.testing.assert_close(grads[S, 1.0][n], grads[1.0, 1.0][n], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_a_loss_scale_that_cannot_be_divided_out_is_refused(bad):
    with pytest.raises(ValueError, match="loss_scale must be a finite number > 0"):
        _private(bad)


def test_float16_autocast_with_a_fixed_loss_scale_trains_like_float32():
    """The documented float16 path: autocast forward, optimizer.backward(S * losses) with the per-sample
    losses, loss_scale=S (a scalar mean loss in 16 bits is refused: test_16bit_mean_loss_is_refused). R is
    large (no sample clipped), so a scale left in would multiply the update by S = 4096."""

    def update(S: float, amp: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        kw = dict(noise_multiplier=0.0, max_grad_norm=1e3, expected_batch_size=EBS, loss_scale=S)
        model, opt = dpkernels.make_private(model, opt, **kw)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            out = model(x)
        losses = (out.float() - y).square().sum(1)
        if amp:
            opt.backward(S * losses)
        else:
            losses.mean().backward()  # float32: the mean loss's update, which the per-sample one equals
        opt.step()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    want, got = update(1.0, False), update(2.0**12, True)
    # float16 keeps 11 significant bits (u = 2^-11 = 4.9e-4) and each value passes a few roundings in the
    # forward and backward: 8u = 3.9e-3 bounds the relative error (4.7e-4 measured); a scale not divided
    # out gives a relative error of S - 1
    assert float((got - want).norm() / want.norm()) < 8 * 2.0**-11


def test_after_a_refused_grad_scaler_step_the_next_step_is_a_fresh_one():
    """The refused step is dropped whole: its (scaled) gradients are not left for a later plain step() to apply,
    and the next loss.backward(); step() is the step a fresh private model takes on that batch."""
    x, y = batch(CASE, B)
    model, opt = _private(noise=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(batch_loss(CASE, model(x), y, "mean")).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)
    assert all(p.grad is None for p in model.parameters())  # a plain opt.step() now would be a noise-only step
    batch_loss(CASE, model(x), y, "mean").backward()
    opt.step()
    fresh, fresh_opt = _private(noise=0.0)
    batch_loss(CASE, fresh(x), y, "mean").backward()
    fresh_opt.step()
    for p, q in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # the same computation on the same inputs


# ----------------------------------------------------------------------------- 16-bit output gradients of a mean loss


class _Seq(nn.Module):
    """The first output of a layer returning a tuple (nn.MultiheadAttention, nn.LSTM, nn.GRU)."""

    def __init__(self, layer: nn.Module, attn: bool = False):
        super().__init__()
        self.layer, self.attn = layer, attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.layer(x, x, x, need_weights=False) if self.attn else self.layer(x))[0]


class _Pos(nn.Module):
    """A (1, 3, 4) position table broadcast over the batch: a tapped raw parameter."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos


class _Frozen16(nn.Module):
    """A frozen bfloat16 layer: its bfloat16 activations round the gradients flowing back through it, while
    the DP layer before it works in float32 (no autocast)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.bfloat16) * self.scale).float()


def _tokens(g: torch.Generator) -> torch.Tensor:
    return torch.randn(5, 3, 4, generator=g)


def _tap_layer() -> nn.Module:
    layer = _Pos()
    dpkernels.tap_parameters(layer, ["pos"])
    return layer


# name -> (the DP layer under test, its input (B = 5)): the model is the layer alone, so that it is the
# first (the only) DP layer the backward reaches, and the error must name it
LAYERS = {
    "linear": (lambda: nn.Linear(4, 3), lambda g: torch.randn(5, 4, generator=g)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3), lambda g: torch.randn(5, 2, 5, 5, generator=g)),
    "embedding": (lambda: nn.Embedding(10, 4), lambda g: torch.randint(0, 10, (5, 3), generator=g)),
    "layernorm": (lambda: nn.LayerNorm(4), _tokens),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), lambda g: torch.randn(5, 4, 3, generator=g)),
    "rmsnorm": (lambda: nn.RMSNorm(4), _tokens),
    "mha": (lambda: _Seq(nn.MultiheadAttention(4, 2, batch_first=True), attn=True), _tokens),
    "lstm": (lambda: _Seq(nn.LSTM(4, 3, batch_first=True)), _tokens),
    "gru": (lambda: _Seq(nn.GRU(4, 3, batch_first=True)), _tokens),
    "tap": (_tap_layer, _tokens),
}  # fmt: skip
# how the 16-bit output gradients arise: bfloat16 autocast (loss.backward(), or optimizer.backward(loss) for
# two-pass), float16 autocast with loss_scale=S, a model in bfloat16, a frozen bfloat16 layer after a float32 one
ROUTES = ["autocast-bf16", "two-pass", "fp16-loss-scale", "bf16-model", "frozen-bf16"]
S = 2.0**8


def _route_model(layer: str, route: str, x: torch.Tensor, reduction: str = "mean"):
    torch.manual_seed(0)
    model = nn.Sequential(LAYERS[layer][0]())
    if route == "frozen-bf16":
        model.append(_Frozen16())
    if route == "bf16-model":
        model.to(torch.bfloat16)
        x = x.to(torch.bfloat16) if x.is_floating_point() else x
    kw = dict(noise_multiplier=1.0, max_grad_norm=0.1, expected_batch_size=EBS, seed=0, loss_reduction=reduction)
    kw["strategy"] = "two-pass" if route == "two-pass" else "bk"
    kw["loss_scale"] = S if route == "fp16-loss-scale" else 1.0
    model, opt = dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)
    return model, opt, x


def _route_losses(model, x: torch.Tensor, route: str) -> torch.Tensor:
    """(B,) per-sample losses, the forward under the route's autocast, times the route's loss scale."""
    amp = {"autocast-bf16": torch.bfloat16, "two-pass": torch.bfloat16, "fp16-loss-scale": torch.float16}
    with torch.autocast("cpu", dtype=amp.get(route, torch.bfloat16), enabled=route in amp):
        out = model(x)
    return (S if route == "fp16-loss-scale" else 1.0) * out.float().square().flatten(1).sum(1)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_16bit_mean_loss_is_refused(layer, route):
    """A scalar mean loss whose output gradients pass through 16 bits is refused at the first DP layer, naming
    it (each row was rounded as g_i / B: the rows depend on the batch size, which one sample changes), before
    any per-sample work: no .grad written, no step counted, and the same batch given per sample next is the
    step a fresh model takes on it, bit for bit (noise included: the refused pass drew nothing)."""
    x = LAYERS[layer][1](torch.Generator().manual_seed(1))
    model, opt, xr = _route_model(layer, route, x)
    loss = _route_losses(model, xr, route).mean()
    with pytest.raises(RuntimeError, match=r"DP layer '0[.']\S* got the output gradients of a mean loss through 16 "
                       r"bits.*no step counted.*optimizer\.backward\(losses\).*loss_reduction='sum'"):  # fmt: skip
        opt.backward(loss) if route == "two-pass" else loss.backward()
    assert all(p.grad is None for p in model.parameters())
    opt.backward(_route_losses(model, xr, route))
    opt.step()
    fresh, fresh_opt, xf = _route_model(layer, route, x)
    fresh_opt.backward(_route_losses(fresh, xf, route))
    fresh_opt.step()
    for (n, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        if p.requires_grad:
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
    assert opt.engine.steps == fresh_opt.engine.steps == 1


@pytest.mark.parametrize("route", ["autocast-bf16", "bf16-model", "frozen-bf16"])
def test_16bit_sum_loss_and_float32_mean_loss_are_not_refused(route):
    """A sum loss rounds each row as fl16(g_i), independent of the other samples: allowed in 16 bits. A mean
    loss is allowed where nothing is 16-bit (float32 model, no autocast)."""
    x = LAYERS["linear"][1](torch.Generator().manual_seed(1))
    model, opt, xr = _route_model("linear", route, x, "sum")
    _route_losses(model, xr, route).sum().backward()
    opt.step()
    model, opt = _private()
    xb, y = batch(CASE, B)
    batch_loss(CASE, model(xb), y, "mean").backward()
    opt.step()


def test_refused_micro_batch_keeps_the_accumulated_ones():
    """With accumulation, a refused micro-batch leaves the earlier ones' clipped sums in place: running it
    again per sample gives the step of a model that never saw the refusal, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    xs = [LAYERS["linear"][1](gen) for _ in range(2)]

    def private():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        kw = dict(noise_multiplier=1.0, max_grad_norm=0.1, expected_batch_size=EBS, seed=0, accumulation_steps=2)
        return dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)

    def losses(model, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float().square().sum(1)

    model, opt = private()
    opt.backward(losses(model, xs[0]))
    with pytest.raises(RuntimeError, match="mean loss through 16 bits"):
        losses(model, xs[1]).mean().backward()
    opt.backward(losses(model, xs[1]))
    opt.step()
    fresh, fresh_opt = private()
    for x in xs:
        fresh_opt.backward(losses(fresh, x))
    fresh_opt.step()
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
