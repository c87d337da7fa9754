"""One benchmark case in its own process: ``python -m bench.worker SPEC_JSON RESULT_PATH``.

A fresh process per (model, batch, dtype, mode) makes the peak memory that mode's own. The
worker imports what the mode needs, takes a memory baseline, builds the model, runs ``warmup``
untimed steps and ``steps`` timed ones, and writes one JSON object to RESULT_PATH, also when
the mode fails (status "error", or "oom" for out-of-memory, with the phase it failed in).

A step is: zero_grad, forward (under torch.autocast for bf16; in a bfloat16 model for bf16w), mean
cross-entropy (for dpkernels modes the (B,) per-sample ones, `modes.per_sample_loss`), the mode's
backward, optimizer.step(). On CUDA each step is bracketed by
torch.cuda.synchronize().

Peak memory:
- cuda: torch.cuda.max_memory_allocated() over the timed steps (the counter is reset after the
  warm-up, so it includes the resident model, gradients and optimizer state);
- cpu: the peak anonymous resident memory of this process over the timed steps, minus its
  anonymous RSS after the imports and before the model was built (see `_cpu_memory`; the
  high-water mark is reset after the warm-up through /proc/self/clear_refs). CPU allocators keep
  freed pages, so this is an upper bound on what the step needed; compare CPU figures only with
  each other.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback
from typing import Any


def _proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process in bytes (those the kernel reports)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_hwm() -> bool:
    """Reset this process's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_memory(before: dict[str, int], hwm_reset: bool) -> dict[str, Any]:
    """Peak memory growth of this process over the timed steps, from /proc/self/status.

    The kernel keeps one peak, VmHWM, of anonymous + file-backed + shared pages. File-backed pages are
    mostly the code of torch's shared libraries, faulted in as kernels are first used (over 100 MiB by
    the first training step) and the same for every mode; they are touched in the warm-up and stay put
    in the timed steps. So the peak of anonymous memory (tensors, allocator arenas) in the timed steps is
    estimated as VmHWM - RssFile - RssShmem read after them, and reported minus RssAnon at the baseline.
    """
    after = _proc_status()
    if "VmHWM" not in after:  # no procfs: the lifetime peak (ru_maxrss is in KB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_mem_bytes": None, "peak_rss_bytes": peak, "mem_kind": "not measured: no /proc/self/status"}
    res: dict[str, Any] = {"peak_rss_bytes": after["VmHWM"], "rss_baseline_bytes": before.get("VmRSS")}
    window = "over the timed steps" if hwm_reset else "over the whole process (its peak could not be reset)"
    if "RssAnon" in after and "RssAnon" in before:
        peak_anon = after["VmHWM"] - after.get("RssFile", 0) - after.get("RssShmem", 0)
        res["peak_mem_bytes"] = peak_anon - before["RssAnon"]
        res["rss_anon_baseline_bytes"] = before["RssAnon"]
        res["rss_file_bytes"] = after.get("RssFile")
        res["mem_kind"] = (
            f"peak anonymous RSS of the worker process {window} (VmHWM - RssFile - RssShmem) minus its "
            "anonymous RSS after imports"
        )
    else:
        res["peak_mem_bytes"] = after["VmHWM"] - before.get("VmRSS", 0)
        res["mem_kind"] = f"peak RSS of the worker process {window} minus its RSS after imports"
    return res


def _quantiles(xs: list[float]) -> dict[str, float]:
    import numpy as np

    q25, q50, q75 = (float(v) for v in np.percentile(xs, [25, 50, 75]))
    return {"median_s": q50, "q25_s": q25, "q75_s": q75, "iqr_s": q75 - q25, "min_s": min(xs), "max_s": max(xs)}


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this process; never raises for a failure of the mode (it is recorded in the result).

    spec: model, batch, dtype ("fp32" | "bf16" | "bf16w"), mode, device, steps, warmup, and optionally
    fastdp_path, threads, seed.
    """
    res: dict[str, Any] = {k: spec[k] for k in ("model", "batch", "dtype", "mode", "device")}
    phase = "import"
    try:
        import torch

        from . import modes
        from .models import build, describe

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        modes.imports(spec["mode"], spec.get("fastdp_path"))
        device = spec["device"]
        cuda = device == "cuda"
        amp = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")
        # Initialise torch's lazy runtime on a throw-away layer so that the baseline below holds it and the
        # measured growth is the model's and the mode's: the first optimizer.step() alone imports ~80 MiB
        # of modules (torch._dynamo), the first backward starts the autograd threads.
        probe = torch.nn.Linear(8, 8).to(device)
        probe_opt = torch.optim.SGD(probe.parameters(), lr=0.0)
        with amp:
            out = probe(torch.randn(2, 8, device=device))
            probe_loss = torch.nn.functional.cross_entropy(out, torch.zeros(2, dtype=torch.long, device=device))
        probe_loss.backward()
        probe_opt.step()
        del probe, probe_opt, probe_loss, out
        gc.collect()
        mem0 = _proc_status()

        phase = "setup"
        work = build(spec["model"], spec["batch"], device, seed=spec.get("seed", 0))
        if spec["dtype"] == "bf16w":  # weights, gradients and optimizer state in bfloat16, no autocast
            work.model.to(torch.bfloat16)
            if work.x.is_floating_point():
                work.x = work.x.to(torch.bfloat16)
        res["model_info"] = describe(work.model)
        ctx = modes.Context(device=device, batch=spec["batch"], fastdp_path=spec.get("fastdp_path"))
        runner = modes.setup(spec["mode"], work, ctx)
        res["changes"] = runner.changes
        model, opt = runner.model, runner.optimizer

        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            with amp:
                out = model(work.x)
                loss = modes.per_sample_loss(work, out) if runner.per_sample else work.loss(out, runner.criterion)
            runner.backward(loss)
            opt.step()
            return loss.detach().mean()  # per-sample losses: their mean is the mean cross-entropy

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        phase = "warmup"
        for _ in range(spec["warmup"]):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        hwm_reset = _reset_hwm() if not cuda else None

        phase = "timed"
        times = []
        loss = None
        for _ in range(spec["steps"]):
            sync()
            t0 = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - t0)

        phase = "report"
        if cuda:
            res["device_name"] = torch.cuda.get_device_name(0)
            res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
            res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            res["mem_kind"] = "torch.cuda.max_memory_allocated over the timed steps"
        elif spec.get("inline"):  # other cases ran in this process before: its RSS is not this case's
            res["peak_mem_bytes"] = None
            res["mem_kind"] = "not measured: --inline runs every case in one process"
        else:
            res.update(_cpu_memory(mem0, bool(hwm_reset)))
        res["step_time"] = _quantiles(times) if times else None
        res["step_times_s"] = times
        res["samples_per_s"] = spec["batch"] / res["step_time"]["median_s"] if times else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        res["params_with_grad"] = sum(p.grad is not None for p in trainable)
        res["params_trainable"] = len(trainable)
        res["final_loss"] = float(loss.detach()) if loss is not None else None
        res["info"] = runner.info()
        res["status"] = "ok"
    except Exception as exc:  # a mode failing on a model is a result, not a harness crash
        oom = type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()
        res["status"] = "oom" if oom else "error"
        res["phase"] = phase
        res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        res["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if "dpkernels" in sys.modules:  # make_private(backend=...) forces a backend process-wide
            sys.modules["dpkernels"].set_backend(None)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m bench.worker SPEC_JSON RESULT_PATH", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    res = run_case(spec)
    tmp = argv[1] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
