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


def _padded_step(mask_of, n: int = 2, device: str = "cpu") -> tuple[nn.Module, Exception | None]:
    """One padded batch of ``n`` samples (pad_to=4) trained with the mask ``mask_of(mask)``: the model, and the
    error the backward raised (None if none)."""
    model = nn.Linear(4, 3).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=2, loss_reduction="sum"
    )
    loader = poisson_loader(TensorDataset(X[:n], Y[:n]), 1.0 - 1e-9, steps=1, pad_to=4)
    for (x, y), mask in loader:
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device), reduction="sum")
        try:
            opt.backward(loss, sample_mask=mask_of(mask))
        except ValueError as e:
            assert all(p.grad is None for p in model.parameters())  # refused before any gradient was written
            return model, e
    return model, None


WRONG = {
    "all True": lambda m: torch.ones_like(m),
    "another batch's (3 samples)": lambda m: torch.arange(4) < 3,
    "a sample dropped": lambda m: torch.arange(4) < 1,
    "rows reordered": lambda m: m.flip(0),
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_a_mask_other_than_the_loaders_is_refused(wrong):
    """Was accepted: an all-True mask trained on the padding rows (2 R per sample, as without a mask)."""
    err = _padded_step(WRONG[wrong])[1]
    assert err is not None and "not the mask poisson_loader" in str(err) and "2 R" in str(err), err


def test_the_loaders_mask_written_in_place_is_refused():
    def written(m):
        m[:] = True
        return m

    err = _padded_step(written)[1]
    assert err is not None and "written in place" in str(err), err


@pytest.mark.parametrize("how", ["the loader's", "a copy", "a hand-made equal one"])
def test_the_loaders_mask_or_an_equal_copy_trains(how):
    of = {
        "the loader's": lambda m: m,
        "a copy": lambda m: m.clone(),
        "a hand-made equal one": lambda m: torch.arange(4) < 2,
    }
    model, err = _padded_step(of[how])
    assert err is None and model.weight.grad is not None


def test_with_several_padded_batches_held_each_trains_with_its_mask_and_none_with_a_mask_of_no_batch():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=2)
    batches = list(poisson_loader(TensorDataset(X, Y), 0.5, steps=3, pad_to=4))
    (x, y), _ = batches[0]
    with pytest.raises(ValueError, match="not the mask poisson_loader"):
        opt.backward(nn.functional.cross_entropy(model(x), y), sample_mask=torch.ones(4, dtype=torch.bool))
    for i, ((x, y), mask) in enumerate(batches):
        opt.backward(nn.functional.cross_entropy(model(x), y), sample_mask=mask if i % 2 else mask.clone())
        opt.step()
        opt.zero_grad()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device path: the check joins the backward's host read")
def test_on_the_device_a_wrong_mask_is_refused_before_any_gradient_is_written():
    err = _padded_step(lambda m: torch.ones_like(m, device="cuda"), device="cuda")[1]
    assert err is not None and "entries differ" in str(err), err
    model, err = _padded_step(lambda m: m.to("cuda"), device="cuda")
    assert err is None and model.weight.grad is not None
