"""Registers and spills of every kernel of the compiled backend (csrc/kernels.cu), from ``ptxas -v``, for
sm_90a and sm_80: ``python -m bench.cuda_ptxas [--out FILE]``. Needs nvcc only (no GPU). Writes a table
(bench/results/cuda_sm90_ptxas.md by default) and exits 1 if any kernel spills.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("sm_90a", "sm_80")
_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _nvcc() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which(os.path.join(CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")) or shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("nvcc not found (set CUDA_HOME)")
    return nvcc


def ptxas_report() -> list[dict]:
    """One row per (kernel, arch): registers, spill stores and loads (bytes)."""
    from torch.utils.cpp_extension import include_paths

    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            _nvcc(),
            "-c",
            str(REPO / "csrc" / "kernels.cu"),
            "-o",
            os.path.join(tmp, "kernels.o"),
            "-std=c++20",
            "-O3",
            "--expt-relaxed-constexpr",
            "-Xptxas",
            "-v",
            *gencode,
            *(f"-I{p}" for p in include_paths(device_type="cuda")),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"nvcc failed:\n{res.stderr[-4000:]}")
    rows, cur = [], None
    for line in res.stderr.splitlines():
        if m := _ENTRY.search(line):
            cur = dict(kernel=m.group(1), arch=m.group(2), registers=None, smem=0, stack=0)
            cur.update(spill_stores=0, spill_loads=0)
            rows.append(cur)
        elif cur is not None and (m := _SPILL.search(line)):
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(m.group(k)) for k in (1, 2, 3))
        elif cur is not None and (m := _USED.search(line)):
            cur["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                cur["smem"] = int(s.group(1))
    names = [r["kernel"] for r in rows]
    if shutil.which("c++filt") and names:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
        for r, n in zip(rows, out, strict=True):
            name = n.replace("dpk::each_kernel<dpk::", "").replace("dpk::tile_kernel<dpk::", "tiles: ")
            name = name.replace(">(", "(").split("(")[0]
            r["kernel"] = name.removeprefix("void ").strip()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "cuda_sm90_ptxas.md"))
    args = p.parse_args()
    rows = ptxas_report()
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    lines = [
        "# Compiled backend (csrc/kernels.cu): ptxas -v",
        "",
        "`python -m bench.cuda_ptxas`: every kernel (one grid-stride kernel per functor and dtype, and the",
        "block-synchronous tile kernels, `tiles:`, of the Linear and Conv clipped sums and of the Conv norms; 256",
        f"threads each) compiled for {', '.join(ARCHS)} with -O3. Spilling kernels: {len(spills)}.",
        "",
        "| kernel | arch | registers | static smem (B) | stack frame (B) | spill stores (B) | spill loads (B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
        lines.append(
            f"| `{r['kernel']}` | {r['arch']} | {r['registers']} | {r['smem']} | {r['stack']} | {r['spill_stores']} "
            f"| {r['spill_loads']} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if spills or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
