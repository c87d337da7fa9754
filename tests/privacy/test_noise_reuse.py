"""No noise stream is drawn twice: a step refused after its noised gradients were written (GradScaler:
scaler.unscale_ reads them) is dropped, and the next step on the same batch must draw fresh noise. With the
same noise, the two readable gradients differ by the difference of two noiseless clipped sums: a replaced
sample shows exactly (sigma = 10 R, yet ||g1 - g2|| was 1.30 <= 2R on a replaced sample; 0 on the same batch).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkernels


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_a_refused_step_does_not_reuse_its_noise(accumulation_steps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=10.0, max_grad_norm=1.0, loss_reduction="sum", expected_batch_size=4,
        accumulation_steps=accumulation_steps,
    )  # fmt: skip
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)

    def step_grads(scale=lambda loss: loss):
        for sl in torch.arange(4).chunk(accumulation_steps):
            scale((model(x[sl]) - y[sl]).square().sum()).backward()
        return _grads(model)

    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # a scale of 1: the engine sees the plain loss
    g1 = step_grads(scaler.scale)
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)
    g2 = step_grads()
    # same batch: the clipped sums are equal, so the difference is the two draws' (~10 * sqrt(2) per coordinate)
    assert float((g1 - g2).abs().min()) > 1e-3
    opt.step()
    g3 = step_grads()
    assert float((g2 - g3).abs().min()) > 1e-3


def test_a_refused_step_whose_noise_was_readable_is_accounted():
    """The noised gradients of a refused step were readable (scaler.unscale_ reads them): a release the
    accountant must count, like any step (it skipped them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, dataset_size=40
    )
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler.scale((model(x) - y).square().sum()).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)
    assert opt.accountant.steps == 1
