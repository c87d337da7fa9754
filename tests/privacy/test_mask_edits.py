"""A pruning mask edited in place after apply_masks (dpkernels.pruning.Mask): norms read rows/cols, sums
read keep, so an edit of one could make a sample's summed (kept) coordinates exceed those its norm counted.
One sample's noiseless summed update is its clipped contribution: it must stay <= R (a row-0-only mask with
keep.fill_(True) gave 2.45 R). Tolerance: float64, one sample, c_i n_i <= R (1 - 2^-52): no margin needed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels import pruning

R = 1.0


def _mask(module: nn.Module, name: str) -> pruning.Mask:
    m = pruning.mask_of(module, name)
    assert m is not None
    return m


def _one_sample_update(edit) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6)).double()
    keep = torch.zeros(6, 4, dtype=torch.bool)
    keep[0] = True  # structured: norms slice row 0 (rows = [0]), sums mask with keep
    pruning.apply_masks(model, {"0.weight": keep})
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, loss_reduction="sum", expected_batch_size=1, seed=1
    )
    edit(_mask(model[0], "weight"))
    x = torch.full((1, 4), 1e3, dtype=torch.float64)
    (model(x) + 1e6).square().sum().backward()  # every row's gradient is large
    opt.step()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_unedited_mask_is_clipped():
    assert float(_one_sample_update(lambda m: None).norm()) <= R


@pytest.mark.parametrize(
    "edit",
    [lambda m: m.keep.fill_(True), lambda m: m.keep.__setitem__(1, True), lambda m: m.rows.fill_(0)],
    ids=["keep.fill_", "keep[1]=", "rows.fill_"],
)
def test_an_in_place_edit_is_refused(edit):
    with pytest.raises(ValueError, match="edited in place after apply_masks"):
        _one_sample_update(edit)


def test_an_edit_the_version_counter_misses_is_ignored():
    """keep.data writes do not bump the version counter: the engine's private copy keeps norms and sums one mask."""
    u = _one_sample_update(lambda m: m.keep.data.fill_(True))
    assert float(u.norm()) <= R
    assert float(u[6:24].abs().max()) == 0.0  # rows 1..5 of the weight stay pruned
