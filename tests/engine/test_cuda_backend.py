"""The compiled backend (csrc/) through the engine: one noiseless DP step of every zoo model with
``set_backend("cuda")`` equals the naive clipped sum (the float64 per-sample oracle of zoo.py), as
test_modes checks for the automatic choice. On the CPU this runs the compiled ops' CPU path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import dpkernels

from .test_modes import _check, run_step
from .zoo import CASES, require

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from _compiled import compiled_backend  # noqa: E402

compiled_backend()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
def test_noiseless_step_on_the_compiled_backend(case, strategy):
    require(case)
    dpkernels.set_backend("cuda")
    dpkernels.ops.last_backend.clear()
    model, expected = run_step(case, "layer-wise", "abadi", strategy, "mean")
    served = set(dpkernels.ops.last_backend.values())
    assert served == {"cuda"}, served
    _check(model, expected)
