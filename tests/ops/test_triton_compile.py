"""Ahead-of-time compilation of every Triton kernel for sm_90 (H100), with no GPU.

Runs ``python -m bench.aot_compile`` in its own process (it needs TRITON_INTERPRET unset, which this
test session sets) and checks what an H100 would get: no register spills, shared memory within an
H100 block's 227 KiB, and tensor cores where the design puts them: 16-bit matmuls on wgmma (HGMMA) for
tiles of >= 64 rows and mma.sync (HMMA) below (the embedding scan's 32-token tiles), none for the
kernels without tl.dot and for IEEE float32 dots. The default test compiles one main configuration of
each kernel family in bf16 (~60 s on one core); the full registry (every family, workload and dtype,
bench/results/aot_sm90.md) is the slow test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
H100_SMEM = 227 * 1024  # the most shared memory one block can have on sm_90

FAMILIES = {
    "linear ghost bound",
    "linear inst bound",
    "bias / affine bound",
    "linear ghost norms",
    "linear inst norms",
    "linear clipped sum",
    "bias norms",
    "bias clipped sum",
    "add_noise",
    "secure noise",
    "embedding norms (gram)",
    "embedding norms (scan)",
    "embedding norms bound",
    "embedding clipped sum",
    "embedding cross (tied head)",
    "affine norms",
    "affine clipped sum",
    "conv ghost norms",
    "conv inst norms",
    "conv clipped sum",
}
# the tensor cores of each kernel at the families' main (bf16) configurations: 64x64 and larger tiles
MAIN_BF16_MMA = {
    "_ghost_kernel": "HGMMA",
    "_inst_kernel": "HGMMA",
    "_clipped_sum_kernel": "HGMMA",  # with a weight; the bias-only variant has no dot (below)
    "_conv_ghost_kernel": "HGMMA",
    "_conv_inst_kernel": "HGMMA",
    "_conv_clipped_sum_kernel": "HGMMA",
    "_embedding_gram_kernel": "HGMMA",
    "_embedding_cross_kernel": "HGMMA",
    "_embedding_scan_kernel": "HMMA",  # 32 sorted tokens a step: below wgmma's 64 rows
    "_embedding_clipped_sum_kernel": "none",  # the one-hot scatter is an IEEE fp32 dot, by design
    "_bias_norms_kernel": "none",
    "_finish_kernel": "none",
    "_secure_noise_kernel": "none",  # ChaCha20 on uint32 and float64 math: no dot
    "_affine_norms_kernel": "none",
    "_affine_clipped_sum_kernel": "none",
    "_ghost_bound_kernel": "HGMMA",
    "_inst_bound_kernel": "HGMMA",
    "_token_norms_kernel": "none",  # float64 sums of squares
    "_sum_bound_kernel": "none",  # float64 sums
    "_embedding_bound_kernel": "none",  # float64 run sums: its dots are float64 (DMMA or FMA, not HGMMA/HMMA)
}
DOT_KERNELS = {k for k, v in MAIN_BF16_MMA.items() if v != "none"}


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "bench.aot_compile", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _within_limits(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        where = f"{r['kernel']} [{r['family']}: {r['workload']} {r['dtype']} {r['config']}]"
        assert r["spill_bytes"] == 0, f"{where} spills {r['spill_bytes']} bytes"
        assert 0 < r["regs"] <= 255, where
        assert r["smem_bytes"] <= H100_SMEM, f"{where} needs {r['smem_bytes']} B of shared memory"
        assert r["tensor_cores"] == r["expected_tensor_cores"], where


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    proc = _cli("--quick", "--json", str(tmp / "aot.json"), "--out", str(tmp / "aot.md"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "aot.json").read_text()), (tmp / "aot.md").read_text(), tmp


def test_quick_every_family_in_bf16(quick):
    """Every family's main configuration (GPT-2 small's attn proj, LayerNorm and wte, ResNet18's layer1
    conv) compiles for sm_90 in bf16 within the limits, and every kernel of the package is among them."""
    data, md, _ = quick
    rows = data["rows"]
    assert set(data["families"]) == FAMILIES
    assert set(data["kernels"]) == set(MAIN_BF16_MMA)  # a new kernel needs a registry entry and a line here
    assert {r["kernel"] for r in rows} == set(MAIN_BF16_MMA)
    assert {r["dtype"] for r in rows} == {"bf16"}
    assert data["problems"] == []
    _within_limits(rows)
    for r in rows:  # the design's tensor cores, written out here rather than taken from the CLI's rule
        want = "none" if r["family"] == "bias clipped sum" else MAIN_BF16_MMA[r["kernel"]]
        assert r["tensor_cores"] == want, f"{r['kernel']} [{r['family']}]: {r['tensor_cores']}, expected {want}"
    for fam in ("linear clipped sum", "affine clipped sum", "conv clipped sum"):  # the split-K and fused paths
        assert {"SPLIT" in r["config"].split() for r in rows if r["family"] == fam} == {True, False}, fam
    assert "no GPU was used" in md and f"triton {data['triton']}" in md
    by_family, every = md.split("## By family")[1].split("## Every kernel")
    assert sum(line.startswith("| ") for line in by_family.splitlines()) == len(FAMILIES) + 1  # + the header
    assert sum(line.startswith("| ") for line in every.splitlines()) == len(rows) + 1


def test_exit_status_flags_spills_smem_and_tensor_cores(quick):
    """The CLI's checks (--recheck: the same checks on saved rows) exit 1 and name the kernel for a
    spill, shared memory past the H100 limit, or tensor cores other than expected; 0 for clean rows."""
    data, _, tmp = quick
    clean = tmp / "clean.json"
    clean.write_text(json.dumps(data))
    proc = _cli("--recheck", str(clean), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    rows = [dict(r) for r in data["rows"]]
    by_kernel = {r["kernel"]: r for r in rows}
    by_kernel["_inst_kernel"]["spill_bytes"] = 8
    by_kernel["_embedding_gram_kernel"]["smem_bytes"] = H100_SMEM + 1
    by_kernel["_conv_ghost_kernel"]["tensor_cores"] = "HMMA"
    bad = tmp / "bad.json"
    bad.write_text(json.dumps({**data, "rows": rows}))
    proc = _cli("--recheck", str(bad), timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert any(line.startswith("_inst_kernel") and "spills 8 bytes" in line for line in lines), proc.stderr
    assert any(line.startswith("_embedding_gram_kernel") and "shared memory" in line for line in lines)
    assert any(line.startswith("_conv_ghost_kernel") and "expected HGMMA" in line for line in lines)
    assert len(lines) == 3


@pytest.mark.slow
def test_full_registry(tmp_path):
    """Every configuration of the registry (bench/results/aot_sm90.md): each family in bf16, fp16 and fp32,
    and in TF32 where its tl.dot follows torch's float32 matmul precision. IEEE float32 dots run on FMA
    units by design, TF32 ones on tensor cores. ~20 minutes on one core."""
    proc = _cli("--json", str(tmp_path / "aot.json"), timeout=3 * 3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "aot.json").read_text())
    rows = data["rows"]
    _within_limits(rows)
    assert {r["kernel"] for r in rows} == set(data["kernels"]) == set(MAIN_BF16_MMA)
    seen = {(r["family"], r["dtype"]) for r in rows}
    tf32 = {"linear ghost norms", "linear inst norms", "linear clipped sum", "embedding cross (tied head)"}
    tf32 |= {f for f in FAMILIES if f.startswith("conv")}
    for fam in FAMILIES:
        for dt in ("bf16", "fp16", "fp32", *(["tf32"] if fam in tf32 else [])):
            assert (fam, dt) in seen, (fam, dt)
    dots = [r for r in rows if r["kernel"] in DOT_KERNELS and r["family"] != "bias clipped sum"]
    assert all(r["tensor_cores"] == "none" for r in dots if r["dtype"] == "fp32")
    assert all(r["tensor_cores"] != "none" for r in dots if r["dtype"] in ("bf16", "fp16", "tf32"))
    assert {"HGMMA", "HMMA"} <= {r["tensor_cores"] for r in dots}  # small tiles (T = 1, 4x4 convs) on mma.sync
    conv_dims = {tok for r in rows if r["kernel"].startswith("_conv") for tok in r["config"].split()}
    assert {"NDIM=1", "NDIM=2", "NDIM=3"} <= conv_dims
