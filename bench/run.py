"""The benchmark harness: ``python -m bench --models gpt2-small --batch-sizes 32 --modes all --device cuda``.

For every (model, batch, dtype, mode) it starts `bench.worker` in a fresh process (so the peak
memory is the mode's own), collects the JSON each writes, puts every figure next to the non-DP
one of the same run (ratios), optionally searches the largest batch each mode fits on the GPU,
and writes results.json, results.md and the plots into --out (see bench/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import modes as M
from . import report
from .models import CONFIGS, get_config

REPO = Path(__file__).resolve().parent.parent
DTYPES = ("fp32", "bf16", "bf16w")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Step time and peak memory of DP training (dpkernels, Opacus, fastDP) against non-DP.",
    )
    p.add_argument("--models", default="gpt2-tiny", help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--batch-sizes", default="", help="comma list of batch sizes (default: each model's own)")
    p.add_argument(
        "--dtype",
        default="fp32",
        help="comma list of fp32, bf16 (torch.autocast, fp32 weights), bf16w (the model cast to bfloat16, no autocast)",
    )
    p.add_argument(
        "--modes",
        default="all",
        help="comma list of: all, nondp, dpk-bk, dpk-two-pass, dpk-layer-wise (each backend, or name:backend), "
        "opacus-hooks, opacus-ghost, fastdp-bk, fastdp-mixopt; families: dpk, opacus, fastdp",
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (>= 10 for the IQR to mean much)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    p.add_argument("--out", default=None, help="output directory (default bench/results/<device>/)")
    p.add_argument("--fastdp-path", default=None, help="directory holding fastDP's source (its fastDP/ package)")
    p.add_argument("--max-batch-search", action="store_true", help="GPU: largest batch each mode fits")
    p.add_argument("--max-batch-limit", type=int, default=4096, help="largest batch the search tries")
    p.add_argument("--max-batch-tol", type=float, default=0.05, help="stop bisecting within this relative gap")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each worker")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a case is killed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--append",
        action="store_true",
        help="merge into --out's results.json: rows of this run replace same (model, batch, dtype, mode) rows; "
        "ratios stay those of the run that measured them (use it to split a long GPU benchmark into runs)",
    )
    p.add_argument(
        "--nproc",
        default=None,
        help="comma list of process counts (e.g. 1,2): data-parallel DP training under torchrun, per-rank time and "
        "memory and the scaling from 1 (bench/distributed.py; writes distributed.json/.md)",
    )
    p.add_argument("--sharding", default="ddp,fsdp", help="with --nproc: comma list of ddp, fsdp (FSDP2)")
    p.add_argument(
        "--inline",
        action="store_true",
        help="debug / CI: run every case in this process instead of one process each (faster; the peak memory "
        "is then not each mode's own, and the results say so)",
    )
    return p


def run_worker(spec: dict[str, Any], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one case in a fresh interpreter; a crash or timeout of the process becomes an "error" result."""
    base = {k: spec[k] for k in ("model", "batch", "dtype", "mode", "device")}
    with tempfile.TemporaryDirectory(prefix="dpk-bench-") as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "bench.worker", json.dumps(spec), path]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**base, "status": "error", "phase": "timeout", "error": f"killed after {timeout:.0f} s"}
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        tail = (proc.stderr or proc.stdout or "")[-2000:]
        oom = "out of memory" in tail.lower() or proc.returncode in (-9, 137)
        return {
            **base,
            "status": "oom" if oom else "error",
            "phase": "process",
            "error": f"worker exited with code {proc.returncode} and no result: {tail.strip()[-600:]}",
        }


def worker_env(mode: str, device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if device == "cpu" and mode.endswith(":triton"):  # only when asked for explicitly: Triton's CPU interpreter
        env["TRITON_INTERPRET"] = "1"
    return env


def search_max_batch(fits: Callable[[int], bool], start: int, limit: int, tol: float = 0.0) -> dict[str, Any]:
    """Largest batch b <= limit with fits(b), by doubling from ``start`` then bisection.

    Assumes fitting is monotone in b. Bisection stops when hi - lo <= max(1, tol * lo). Returns
    {"max_batch": lo (0 if even 1 does not fit), "upper": the smallest b seen not to fit (None if none
    did up to limit), "probes": [(b, fits), ...]}.
    """
    if start < 1 or limit < 1:
        raise ValueError(f"search_max_batch: start and limit must be >= 1, got {start}, {limit}")
    probes: list[tuple[int, bool]] = []

    def probe(b: int) -> bool:
        ok = fits(b)
        probes.append((b, ok))
        return ok

    lo, hi = 0, None
    b = min(start, limit)
    while True:
        if probe(b):
            lo = b
            if b >= limit:
                break
            b = min(2 * b, limit)
        else:
            hi = b
            break
    if hi is not None:
        while hi - lo > max(1, int(tol * lo)):
            mid = (lo + hi) // 2
            if probe(mid):
                lo = mid
            else:
                hi = mid
    return {"max_batch": lo, "upper": hi, "probes": probes}


def meta(args: argparse.Namespace, argv: Sequence[str], results: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Versions, device and command line of this run (the GPU's name as a worker saw it: the harness process
    itself never creates a CUDA context, which would take memory from the workers)."""
    import datetime
    import importlib.metadata as md
    import platform

    import torch

    def ver(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": ver("triton"),
        "opacus": ver("opacus"),
        "dpkernels": ver("dpkernels"),
        "torchvision": ver("torchvision"),
        "device": args.device,
        "steps": args.steps,
        "warmup": args.warmup,
        "optimizer": "SGD(lr=1e-4)",
        "privacy": f"noise_multiplier={M.NOISE_MULTIPLIER}, max_grad_norm={M.MAX_GRAD_NORM}, flat clipping, mean loss",
        "dtype_meaning": "fp32: float32 throughout; bf16: torch.autocast(bfloat16) with float32 weights; "
        "bf16w: the model cast to bfloat16 (weights, gradients, optimizer state), no autocast",
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if args.device == "cuda":
        info["device_name"] = next((r["device_name"] for r in results if r.get("device_name")), "cuda")
        info["cuda"] = torch.version.cuda
        info["memory_measure"] = "torch.cuda.max_memory_allocated over the timed steps"
    else:
        info["device_name"] = cpu_name()
        info["memory_measure"] = (
            "CPU: peak anonymous RSS of the worker process over the timed steps (VmHWM - RssFile - RssShmem) "
            "minus its anonymous RSS after imports, before the model was built (an upper bound: allocators keep "
            "freed pages)"
        )
        info["threads"] = args.threads or torch.get_num_threads()
    if args.fastdp_path:
        info["fastdp_path"] = os.path.abspath(args.fastdp_path)
        info["fastdp"] = fastdp_version(args.fastdp_path)
    return info


def cpu_name() -> str:
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name}, {os.cpu_count()} logical cores visible"


def fastdp_version(path: str) -> str | None:
    import re

    try:
        text = (Path(path) / "fastDP" / "__init__.py").read_text()
    except OSError:
        return None
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
    return m.group(1) if m else None


def add_ratios(results: list[dict[str, Any]]) -> None:
    """time_ratio and mem_ratio of each ok result against the ok non-DP result of the same (model, batch, dtype)."""
    base = {(r["model"], r["batch"], r["dtype"]): r for r in results if r["mode"] == "nondp" and r["status"] == "ok"}
    for r in results:
        b = base.get((r["model"], r["batch"], r["dtype"]))
        r["time_ratio"] = r["mem_ratio"] = None
        if r["status"] != "ok" or b is None:
            continue
        r["time_ratio"] = r["step_time"]["median_s"] / b["step_time"]["median_s"]
        if r.get("peak_mem_bytes") is not None and (b.get("peak_mem_bytes") or 0) > 0:
            r["mem_ratio"] = r["peak_mem_bytes"] / b["peak_mem_bytes"]


def merge(
    path: Path, results: list[dict[str, Any]], searches: list[dict[str, Any]], info: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Earlier results in ``path`` plus this run's, this run's rows winning; each row keeps its run's ratios."""
    old = json.loads(path.read_text())
    prev = old.get("meta", {})
    runs = [*prev.pop("runs", []), {k: prev[k] for k in ("timestamp", "command") if k in prev}]
    stamp = info["timestamp"]
    for r in results:
        r.setdefault("run", stamp)
    new_keys = {(r["model"], r["batch"], r["dtype"], r["mode"]) for r in results}
    kept = [r for r in old.get("results", []) if (r["model"], r["batch"], r["dtype"], r["mode"]) not in new_keys]
    for r in kept:
        r.setdefault("run", prev.get("timestamp"))
    skeys = {(s["model"], s["dtype"], s["mode"]) for s in searches}
    kept_s = [s for s in old.get("max_batch", []) if (s["model"], s["dtype"], s["mode"]) not in skeys]
    return kept + results, kept_s + searches, {**info, "runs": runs}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    models = _csv(args.models)
    for m in models:
        get_config(m)
    dtypes = _csv(args.dtype)
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtype: unknown {d!r}; choose from {', '.join(DTYPES)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if args.steps < 10:
        print(f"note: {args.steps} timed step(s): medians and IQRs over fewer than 10 steps mean little", flush=True)
    if args.fastdp_path and not (Path(args.fastdp_path) / "fastDP" / "__init__.py").exists():
        raise SystemExit(f"--fastdp-path {args.fastdp_path!r} has no fastDP/__init__.py")
    if args.nproc:
        from . import distributed

        return distributed.main(args, argv)
    mode_list, skipped = M.expand(_csv(args.modes), args.device, args.fastdp_path)
    if skipped:
        print(f"{M.FASTDP_SKIP}: not running {', '.join(skipped)}", flush=True)
    if mode_list and mode_list[0] != "nondp":
        mode_list.insert(0, "nondp")
        print("note: added the nondp baseline (every ratio is against it)", flush=True)
    batches_arg = [int(b) for b in _csv(args.batch_sizes)]
    out = Path(args.out or REPO / "bench" / "results" / args.device)

    cases = []
    for model in models:
        for batch in batches_arg or [get_config(model).default_batch]:
            for dtype in dtypes:
                for mode in mode_list:
                    cases.append((model, batch, dtype, mode))

    def spec(model: str, batch: int, dtype: str, mode: str, steps: int, warmup: int) -> dict[str, Any]:
        return {
            "model": model,
            "batch": batch,
            "dtype": dtype,
            "mode": mode,
            "device": args.device,
            "steps": steps,
            "warmup": warmup,
            "fastdp_path": os.path.abspath(args.fastdp_path) if args.fastdp_path else None,
            "threads": args.threads,
            "seed": args.seed,
        }

    results: list[dict[str, Any]] = []
    bar = tqdm(cases, desc="bench", unit="case", dynamic_ncols=True)
    for model, batch, dtype, mode in bar:
        bar.set_postfix_str(f"{model} B={batch} {dtype} {mode}")
        sp = spec(model, batch, dtype, mode, args.steps, args.warmup)
        if args.inline:
            from .worker import run_case

            r = {**run_case({**sp, "inline": True}), "isolation": "inline"}
        else:
            r = {**run_worker(sp, args.timeout, worker_env(mode, args.device)), "isolation": "process"}
        results.append(r)
        if r["status"] != "ok":
            tqdm.write(f"{mode} on {model} B={batch} {dtype}: {r['status']} ({r.get('error', '')[:200]})")
    bar.close()
    for name in skipped:
        for model in models:
            for batch in batches_arg or [get_config(model).default_batch]:
                for dtype in dtypes:
                    results.append(
                        {
                            "model": model,
                            "batch": batch,
                            "dtype": dtype,
                            "mode": name,
                            "device": args.device,
                            "status": "skipped",
                            "error": M.FASTDP_SKIP,
                        }
                    )
    add_ratios(results)

    searches: list[dict[str, Any]] = []
    if args.max_batch_search:
        if args.device != "cuda":
            print("skipped: --max-batch-search needs --device cuda (CPU memory does not run out cleanly)", flush=True)
        else:
            for model in models:
                for dtype in dtypes:
                    for mode in tqdm(mode_list, desc=f"max batch {model} {dtype}", unit="mode"):

                        def fits(b: int, model: str = model, dtype: str = dtype, mode: str = mode) -> bool:
                            r = run_worker(spec(model, b, dtype, mode, 1, 1), args.timeout, worker_env(mode, "cuda"))
                            if r["status"] == "error":
                                raise RuntimeError(r.get("error", "error"))
                            return r["status"] == "ok"

                        start = min(batches_arg or [get_config(model).default_batch])
                        entry: dict[str, Any] = {"model": model, "dtype": dtype, "mode": mode}
                        try:
                            entry.update(search_max_batch(fits, start, args.max_batch_limit, args.max_batch_tol))
                        except RuntimeError as exc:
                            entry.update({"max_batch": None, "error": str(exc)[:500]})
                        searches.append(entry)

    info = meta(args, argv, results)
    if args.append and (out / "results.json").exists():
        results, searches, info = merge(out / "results.json", results, searches, info)
    if args.inline:
        info["isolation"] = "inline: every case ran in one process, so peak memory is not each mode's own"
    paths = report.write(out, info, results, searches, plots=not args.no_plots)
    print(report.markdown(info, results, searches), flush=True)
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0
