"""Every kernel of the compiled backend compiles for sm_90a and sm_80 without spilling (``ptxas -v``, via
bench/cuda_ptxas.py). Slow (nvcc, ~1-3 min); needs nvcc, not a GPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_no_kernel_spills():
    pytest.importorskip("torch.utils.cpp_extension")
    from dpkernels.ops.cuda._build import nvcc

    if nvcc() is None:
        pytest.skip("no nvcc here")
    from bench.cuda_ptxas import ARCHS, ptxas_report

    rows = ptxas_report()
    # one kernel per DPK_INST / DPK_INST_TILES line of kernels.cu (DPK_INST_IN: four dtypes), per arch
    src = (REPO / "csrc" / "kernels.cu").read_text()
    n_inst = len(re.findall(r"^DPK_INST(_TILES)?\(", src, re.M)) + 4 * len(re.findall(r"^DPK_INST_IN\(", src, re.M))
    assert len(rows) == n_inst * len(ARCHS)
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, spilling
