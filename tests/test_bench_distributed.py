"""Smoke test of ``python -m bench --nproc`` (bench/distributed.py): per-rank rows, memory, scaling.

No speed is asserted: the tests check what the harness measures and how it summarises it.
"""

import json

import pytest

from bench.distributed import launch, markdown, summarise
from bench.run import main


def _row(mode, sharding, n, rank, median, mem=100):
    return {
        "model": "m", "batch": 4, "mode": mode, "sharding": sharding, "nproc": n, "rank": rank, "status": "ok",
        "step_time": {"median_s": median}, "peak_mem_bytes": mem, "param_bytes": 10 // n, "grad_bytes": 10 // n,
    }  # fmt: skip


def test_summary_takes_the_slowest_rank_and_scales_against_one_process():
    rows = [_row("dpk-bk", "ddp", 1, 0, 1.0), _row("dpk-bk", "ddp", 2, 0, 1.0), _row("dpk-bk", "ddp", 2, 1, 1.6, 300)]
    by = {s["nproc"]: s for s in summarise(rows)}
    assert by[2]["step_s"] == 1.6  # the step waits for the slowest rank
    assert by[2]["samples_per_s"] == pytest.approx(8 / 1.6)
    assert by[2]["scaling_vs_1"] == pytest.approx((8 / 1.6) / 4.0)
    assert by[1]["scaling_vs_1"] == 1.0 and by[2]["peak_mem_bytes_max_rank"] == 300
    info = {"device_name": "CPU", "command": "c", "timestamp": "t", "torch": "x", "memory_measure": "m"}
    assert "| m | 4 | dpk-bk | ddp | 2 | 1600.0 | 5.0 | 1.25 |" in markdown(info, summarise(rows), rows)


@pytest.mark.slow  # one torchrun launch: ~20 s of CPU (three interpreters importing torch)
def test_one_fsdp_launch_reports_every_rank_sharded():
    """One torchrun launch, 2 ranks, FSDP2 + dpkernels on mlp-tiny: a row per rank, each holding about half of
    the parameters (fully_shard on the root: every parameter sharded over dimension 0)."""
    spec = {"model": "mlp-tiny", "batch": 3, "mode": "dpk-bk", "sharding": "fsdp", "device": "cpu", "steps": 2,
            "warmup": 1, "threads": 1, "seed": 0}  # fmt: skip
    rows = launch(spec, 2, timeout=600)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows[0].get("error")
    assert sorted(r["rank"] for r in rows) == [0, 1]
    full = (12 * 24 + 24) + (24 * 24 + 24) + (24 * 5 + 5)  # mlp-tiny: d_in 12, hidden 24, 2 layers, 5 classes
    total = sum(r["param_bytes"] for r in rows)
    assert total == 4 * full and all(r["param_bytes"] < 0.6 * 4 * full for r in rows)
    assert all(r["grad_bytes"] == r["param_bytes"] for r in rows)  # the gradients are the shards' own
    assert all(r["peak_mem_bytes"] is not None and r["step_time"]["median_s"] > 0 for r in rows)


@pytest.mark.slow  # 4 torchrun launches
def test_cli_writes_per_rank_rows_and_scaling(tmp_path):
    argv = ["--models", "mlp-tiny", "--batch-sizes", "3", "--modes", "dpk-bk", "--device", "cpu", "--nproc", "1,2",
            "--sharding", "ddp", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "distributed.json").read_text())
    assert {(s["mode"], s["nproc"]) for s in data["summary"]} == {(m, n) for m in ("nondp", "dpk-bk") for n in (1, 2)}
    assert len(data["ranks"]) == 2 * (1 + 2)
    assert all(s["scaling_vs_1"] > 0 for s in data["summary"])
    assert "scaling" in (tmp_path / "distributed.md").read_text()
