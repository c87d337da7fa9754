"""Padded Poisson batches (poisson_loader(pad_to=P)): remove-one sensitivity of the noiseless update, with the
mask passed and without it. The padding rows are zeros, yet a zero row still has a gradient (a bias's); their
number is P minus the realised batch size, so without the mask removing one sample adds a padding row whose
clipped gradient (chosen here to pull the bias the other way) joins the difference: 2 R instead of R. A DP
backward without a mask after a padded batch was yielded is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dpkernels
from dpkernels.data import poisson_loader

R = 0.1
X = torch.zeros(2, 4)
Y = torch.tensor([0, 1])  # padding rows have label 0; the removed sample (label 1) pulls the bias the other way


def _update(n: int, masked: bool) -> torch.Tensor:
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([10.0, 10.0, -10.0]))  # softmax ~ (1/2, 1/2, 0): labels 0 and 1 opposite
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=2, loss_reduction="sum"
    )
    before = model.bias.detach().clone()
    loader = poisson_loader(
        TensorDataset(X[:n], Y[:n]), 1.0 - 1e-9, steps=1, pad_to=4, generator=torch.Generator().manual_seed(0)
    )
    (x, y), mask = next(iter(loader))
    assert int(mask.sum()) == n  # every sample drawn (rate 1 - 1e-9, seeded)
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    if masked:
        opt.backward(loss, sample_mask=mask)
    else:
        loss.backward()
    opt.step()
    return model.bias.detach() - before


def _sensitivity(masked: bool) -> float:
    return float((_update(2, masked) - _update(1, masked)).norm()) / R


def test_with_the_mask_one_sample_moves_the_update_by_at_most_R():
    # both samples clip to R; 1e-5 relative: the certified factors' float32 margin
    assert _sensitivity(masked=True) <= 1 + 1e-5


def test_without_the_mask_a_padded_batch_is_refused():
    """Was accepted: one sample moved the update by 2.0 R. The next masked backward trains again."""
    with pytest.raises(ValueError, match="without sample_mask after poisson_loader"):
        _update(2, masked=False)
    assert _sensitivity(masked=True) <= 1 + 1e-5
