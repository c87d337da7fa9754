"""One benchmark case in its own process: ``python -m bench.worker SPEC_JSON RESULT_PATH``.

A fresh process per (model, batch, dtype, mode) makes the peak memory that mode's own. The
worker imports what the mode needs, takes a memory baseline, builds the model, runs ``warmup``
untimed steps and ``steps`` timed ones, and writes one JSON object to RESULT_PATH, also when
the mode fails (status "error", or "oom" for out-of-memory, with the phase it failed in).

A step is: zero_grad, forward (under torch.autocast for bf16; in a bfloat16 model for bf16w), mean
cross-entropy, the mode's backward, optimizer.step(). On CUDA each step is bracketed by
torch.cuda.synchronize().

Peak memory:
- cuda: torch.cuda.max_memory_allocated() over the timed steps (the counter is reset after the
  warm-up, so it includes the resident model, gradients and optimizer state);
- cpu: the peak resident set size (VmHWM) of this process over the timed steps, minus its RSS
  after the imports and before the model was built (the high-water mark is reset after the
  warm-up through /proc/self/clear_refs). CPU allocators keep freed pages, so this is an upper
  bound on what the step needed; compare CPU figures only with each other.
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


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset this process's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return (kb or 0) * 1024


def _hwm_bytes() -> int:
    kb = _status_kb("VmHWM")
    if kb is None:  # no procfs: the lifetime peak (ru_maxrss is in KB on Linux)
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


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
        # Initialise torch's lazy runtime (allocator pools, autograd threads, kernels) on a throw-away layer so
        # the baseline below holds it and the measured growth is the model's and the mode's.
        probe = torch.nn.Linear(8, 8).to(device)
        with amp:
            probe(torch.randn(2, 8, device=device)).sum().backward()
        del probe
        gc.collect()
        rss0 = _rss_bytes()

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
                loss = work.loss(out, runner.criterion)
            runner.backward(loss)
            opt.step()
            return loss

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
            hwm = _hwm_bytes()
            res["peak_mem_bytes"] = hwm - rss0
            res["peak_rss_bytes"] = hwm
            res["rss_baseline_bytes"] = rss0
            res["mem_kind"] = (
                "peak RSS of the worker process over the timed steps minus its RSS after imports"
                if hwm_reset
                else "lifetime peak RSS of the worker process minus its RSS after imports (peak not resettable here)"
            )
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
