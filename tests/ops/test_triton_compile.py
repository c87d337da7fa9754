"""Ahead-of-time compilation of the Triton kernels for sm_90 (H100), with no GPU.

Runs bench/aot_compile.py in its own process (it needs TRITON_INTERPRET unset, which this
test session sets) and checks what the GPU would get: no register spills, shared memory
within an H100's 227 KiB per block, and tensor cores in every 16-bit (and TF32) matmul
kernel: Hopper's wgmma (HGMMA) for the large tiles of real layers; tiles of 16 rows (a
layer with T = 1 or p <= 16) are below wgmma's 64-row minimum and get mma.sync (HMMA).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
H100_SMEM = 227 * 1024  # max dynamic shared memory per block on sm_90
MATMULS = ("_ghost_kernel", "_inst_kernel")  # and _clipped_sum_kernel with HAS_WEIGHT=True


def _aot(tmp_path, *args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "aot_compile.py"), "--json", str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| kernel |" in proc.stdout  # the markdown table
    return json.loads(out.read_text())


def _is_matmul(row) -> bool:
    return row["kernel"] in MATMULS or (row["kernel"] == "_clipped_sum_kernel" and "HAS_WEIGHT=True" in row["config"])


def _check(rows, tensor_core_dtypes):
    assert rows
    for r in rows:
        where = f"{r['kernel']} [{r['config']}]"
        assert r["spill_bytes"] == 0, f"{where} spills {r['spill_bytes']} bytes"
        assert r["regs"] <= 255, where
        assert r["smem_bytes"] <= H100_SMEM, f"{where} needs {r['smem_bytes']} B of shared memory"
        if _is_matmul(r) and r["config"].split()[0] in tensor_core_dtypes:
            small = any(f"{b}=16 " in r["config"] for b in ("BLOCK_T", "BLOCK_P"))
            wanted = "HMMA" if small else "HGMMA"
            assert wanted in r["tensor_cores"], f"{where} does not use {wanted}: {r['tensor_cores']}"


def test_aot_bf16(tmp_path):
    """The training dtype: every kernel once (ghost, inst, the clipped sum split-K, fused with and
    without noise, the bias kernels, the finish kernel)."""
    rows = _aot(tmp_path, "--quick", "--dtypes", "bf16")
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_ghost_kernel", "_inst_kernel", "_clipped_sum_kernel", "_finish_kernel", "_bias_norms_kernel"}
    assert sum(_is_matmul(r) for r in rows) == 5  # ghost, inst, and three clipped-sum variants
    _check(rows, {"bf16"})


@pytest.mark.slow
def test_aot_main_configurations(tmp_path):
    """fp32 (IEEE: no tensor cores by design), fp32 with TF32, bf16 and fp16, on GPT-2-small-like
    layers (d = p = 768, T = 256; d = 768, p = 3072, T = 1024) and a small head (T = 1, p = 10)."""
    rows = _aot(tmp_path)
    _check(rows, {"fp32+tf32", "bf16", "fp16"})
    ieee = [r for r in rows if _is_matmul(r) and r["config"].startswith("fp32 ")]
    assert ieee and all(r["tensor_cores"] == "none" for r in ieee)  # "ieee" fp32 dots run on FMA units
