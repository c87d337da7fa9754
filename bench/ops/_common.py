"""Shared machinery of the op benchmarks (bench/ops/bench_<op>.py).

Each bench_<op>.py defines ``OP`` (the dpkernels.ops name), ``GPU_CASES`` (GPT-2-small / ResNet-18
shapes) and ``CPU_CASES`` (small shapes for pytest-benchmark), ``make(case, dtype, device) ->
(args, kwargs)`` and the nominal work of one call, ``flops(case)`` and ``nbytes(case, itemsize)``
(the dense formulas of the reference's math, stated in each file; a kernel that exploits symmetry
does less work than counted, so its figure is "effective" TFLOP/s).

On CUDA every available backend is timed with ``triton.testing.do_bench`` and reported as ms,
achieved TFLOP/s and GB/s, and the fraction of an H100's ~790 TFLOP/s (bf16/fp16 dense) and
~3 TB/s (HBM3). On the CPU the reference is timed with torch.utils.benchmark (the same table,
without peaks). Rows are appended to bench/results/<device>/ops.csv with device, time and versions,
and with the Triton kernels each call launched: grid, warps, stages, register budget and block sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.metadata as md
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

H100_PEAK_TFLOPS = {torch.bfloat16: 790.0, torch.float16: 790.0}  # dense tensor-core peak used for targets
H100_PEAK_TBPS = 3.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
REPO = Path(__file__).resolve().parents[2]


def call(op: str, args: Sequence[Any], kwargs: dict[str, Any], backend: str) -> Any:
    """dpkernels.ops.<op>(*args, backend=backend, **kwargs); returns the result."""
    from dpkernels import ops

    return getattr(ops, op)(*args, backend=backend, **kwargs)


def served_by(op: str) -> str:
    """The backend that served the last call of ``op`` (an op a backend lacks falls back to the reference)."""
    from dpkernels import ops

    return ops.last_backend.get(op, "?")


def launches(backend: str) -> contextlib.AbstractContextManager[list]:
    """Records the Triton kernels launched in the block (dpkernels.ops.triton's observe_launches)."""
    if backend != "triton":
        return contextlib.nullcontext([])
    from dpkernels.ops.triton._common import observe_launches

    return observe_launches()


def time_ms(fn: Any, device: str) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, torch.utils.benchmark on the CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    from torch.utils import benchmark

    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3


def measure(mod: ModuleType, case: dict[str, Any], dtype: torch.dtype, device: str, backend: str) -> dict[str, Any]:
    """One row: time, achieved TFLOP/s and GB/s of ``mod.OP`` on ``case`` with ``backend``."""
    args, kwargs = mod.make(case, dtype, device)
    with launches(backend) as seen:
        call(mod.OP, args, kwargs, backend)  # compile / warm up, and learn which backend serves it
    row: dict[str, Any] = {"op": mod.OP, "case": case["name"], "dtype": str(dtype).replace("torch.", "")}
    row["backend"] = backend
    row["served_by"] = served_by(mod.OP)
    row["kernels"] = "; ".join(x.describe() for x in seen)
    ms = time_ms(lambda: call(mod.OP, args, kwargs, backend), device)
    f, b = mod.flops(case), mod.nbytes(case, torch.empty(0, dtype=dtype).element_size())
    row.update(ms=ms, gflop=f / 1e9, mbyte=b / 1e6, tflops=f / ms / 1e9, gbps=b / ms / 1e6)
    if device == "cuda":
        peak = H100_PEAK_TFLOPS.get(dtype)
        row["pct_peak_flops"] = 100 * row["tflops"] / peak if peak else None
        row["pct_peak_bw"] = 100 * row["gbps"] / (H100_PEAK_TBPS * 1e3)
    return row


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    from bench.run import cpu_name

    return cpu_name()


def append_csv(path: Path, rows: list[dict[str, Any]], device: str) -> None:
    """Append rows with device name, UTC time and versions (a header when the file is new)."""

    def ver(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"

    stamp = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": ver("triton"),
        "dpkernels": ver("dpkernels"),
    }
    fields = [*stamp, "op", "case", "dtype", "backend", "served_by", "ms", "gflop", "mbyte", "tflops", "gbps",
              "pct_peak_flops", "pct_peak_bw", "kernels"]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**stamp, **r})


def table(rows: list[dict[str, Any]]) -> str:
    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    out = ["| op | case | dtype | backend (served by) | ms | GFLOP/s | GB/s | % peak FLOP/s | % peak BW |",
           "|---|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        gflops = None if r["tflops"] is None else r["tflops"] * 1e3
        out.append(
            f"| {r['op']} | {r['case']} | {r['dtype']} | {r['backend']} ({r['served_by']}) | {f(r['ms'], '.3f')} "
            f"| {f(gflops, '.1f')} | {f(r['gbps'], '.1f')} | {f(r.get('pct_peak_flops'), '.1f')} "
            f"| {f(r.get('pct_peak_bw'), '.1f')} |"
        )
    configs = [r for r in rows if r.get("kernels")]
    if configs:
        out += ["", "Kernel launches (grid, warps, stages, register budget, block sizes):", ""]
        out += [f"- {r['op']} {r['case']} {r['dtype']}: {r['kernels']}" for r in configs]
    return "\n".join(out)


def backends_for(device: str) -> list[str]:
    import dpkernels

    return [b for b in dpkernels.available_backends() if device == "cuda" or b == "reference"]


def run(mods: Sequence[ModuleType], argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """CLI of one or more op benchmarks: prints a markdown table and appends bench/results/<device>/ops.csv."""
    p = argparse.ArgumentParser(description=f"benchmark dpkernels ops: {', '.join(m.OP for m in mods)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, help="comma list of fp32, bf16, fp16 (default: cuda bf16,fp32; cpu fp32)")
    p.add_argument("--backends", default=None, help="comma list (default: every available backend on cuda)")
    p.add_argument("--cases", default="gpu", choices=["gpu", "cpu"], help="GPT-2-small shapes (gpu) or small ones")
    p.add_argument("--csv", default=None, help="CSV to append to (default bench/results/<device>/ops.csv)")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu (with --cases cpu)")
    dtypes = [DTYPES[d] for d in (args.dtype or ("bf16,fp32" if args.device == "cuda" else "fp32")).split(",")]
    backends = args.backends.split(",") if args.backends else backends_for(args.device)
    rows = []
    for mod in mods:
        cases = mod.GPU_CASES if args.cases == "gpu" else mod.CPU_CASES
        for case in cases:
            for dt in dtypes:
                for be in backends:
                    try:
                        rows.append(measure(mod, case, dt, args.device, be))
                    except Exception as exc:  # a backend lacking a shape or dtype is a result too
                        rows.append({"op": mod.OP, "case": case["name"], "dtype": str(dt).replace("torch.", ""),
                                     "backend": be, "served_by": f"error: {type(exc).__name__}: {exc}"[:160],
                                     "ms": None, "tflops": None, "gbps": None})  # fmt: skip
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
    print(table(rows), flush=True)
    if not args.no_csv:
        path = Path(args.csv or REPO / "bench" / "results" / args.device / "ops.csv")
        append_csv(path, [r for r in rows if r.get("ms") is not None], args.device)
        print(f"appended {sum(r.get('ms') is not None for r in rows)} row(s) to {os.path.relpath(path)}")
    return rows


def pytest_case(mod: ModuleType, benchmark: Any, case: dict[str, Any]) -> None:
    """pytest-benchmark body: the reference ``mod.OP`` on a CPU case in float32, with GFLOP/s and GB/s recorded."""
    args, kwargs = mod.make(case, torch.float32, "cpu")
    out = benchmark(call, mod.OP, args, kwargs, "reference")
    first = out[0] if isinstance(out, tuple) else out
    assert first is not None and bool(torch.isfinite(first).all()), f"{mod.OP} gave a non-finite result on {case}"
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        med = stats.stats.median
        benchmark.extra_info["gflops_per_s"] = mod.flops(case) / med / 1e9
        benchmark.extra_info["gbytes_per_s"] = mod.nbytes(case, 4) / med / 1e9
