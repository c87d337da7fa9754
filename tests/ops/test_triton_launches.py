"""observe_launches: the record of what each Triton kernel was launched with (the op benchmarks report
it beside their timings), and its dry-run mode (bench/aot_compile.py compiles what it records)."""

from __future__ import annotations

import importlib

import pytest
import torch
from _device import DEVICE

from dpkernels.ops.triton._common import observe_launches

lcs = importlib.import_module("dpkernels.ops.triton.linear_clipped_sum")


def _inputs(B, T, d, p, device=DEVICE):
    torch.manual_seed(0)
    a = torch.randn(B, T, d, device=device)
    g = torch.randn(B, T, p, device=device)
    return a, g, torch.rand(B, device=device)


@pytest.mark.parametrize("splits", [None, 2])
def test_records_the_config_of_each_launch(splits):
    B, T, d, p = 3, 40, 24, 20
    a, g, c = _inputs(B, T, d, p)
    kw = dict(noise_std=1.0, scale=0.5, seed_w=1, seed_b=2, prev_w=None, prev_b=None)
    with observe_launches() as seen:
        w, _ = lcs.launch_clipped_sum(a, g, c, True, splits=splits, **kw)
    want = lcs.config(p, d, torch.float32)
    names = [x.kernel.__name__ for x in seen]
    assert names == (
        ["_clipped_sum_kernel"] if splits is None else ["_clipped_sum_kernel", "_finish_kernel", "_finish_kernel"]
    )
    main = seen[0]
    assert (main.num_warps, main.num_stages, main.maxnreg) == (
        want["num_warps"],
        want["num_stages"],
        want.get("maxnreg"),
    )
    assert {k: main.meta[k] for k in ("BLOCK_P", "BLOCK_D", "BLOCK_K")} == {
        k: want[k] for k in ("BLOCK_P", "BLOCK_D", "BLOCK_K")
    }
    assert main.grid[:2] == (-(-p // want["BLOCK_P"]), -(-d // want["BLOCK_D"]))
    assert main.grid[2] == (1 if splits is None else 2)
    text = main.describe()
    assert text.startswith("_clipped_sum_kernel[") and f"warps={want['num_warps']}" in text and "BLOCK_P=" in text
    assert torch.isfinite(w).all()  # it ran: the observer does not stop a real launch
    with observe_launches() as again:
        pass
    assert again == []  # each block records its own launches only


def test_dry_run_launches_nothing():
    """run=False: the launchers run on meta tensors (no device guard), nothing is launched."""
    a, g, c = _inputs(2, 8, 16, 16, device="meta")
    with observe_launches(run=False) as seen:
        w, b = lcs.launch_clipped_sum(
            a, g, c, True, noise_std=0.0, scale=1.0, seed_w=1, seed_b=2, prev_w=None, prev_b=None
        )
    assert w.device.type == "meta" and b.shape == (16,)
    assert [x.kernel.__name__ for x in seen] == ["_clipped_sum_kernel"]


def test_op_benchmark_rows_name_the_kernels():
    """bench/ops rows carry the launches of the backend that served them (none for the reference)."""
    from bench.ops import _common as bo
    from bench.ops import bench_linear_norms as mod

    case = mod.CPU_CASES[-1]
    rows = {be: bo.measure(mod, case, torch.float32, DEVICE.type, be) for be in ("triton", "reference")}
    assert rows["triton"]["served_by"] == "triton" and "_kernel[" in rows["triton"]["kernels"]
    assert rows["reference"]["kernels"] == ""
    assert "Kernel launches" in bo.table(list(rows.values()))
