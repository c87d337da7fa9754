"""Mixed precision: torch.amp.GradScaler is refused at the step (its scale reaches the clipping, and its
skipped steps would depend on the batch); a fixed loss scale (make_private(loss_scale=S)) is divided out
before clipping, so the bound R applies to the unscaled per-sample gradients and the noise keeps its scale."""

from __future__ import annotations

import pytest
import torch

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
    """The documented float16 path: autocast forward, (S * loss).backward(), loss_scale=S. R is large (no
    sample clipped), so a scale left in would multiply the update by S = 4096."""

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
        (S * (out.float() - y).square().sum(1).mean()).backward()
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
