"""Per-step overhead of DP training against non-DP, counted on the CPU: ``python -m bench.overhead``.

For every (model, batch, mode) a fresh process (as in `bench.run`: a mode may patch torch or force a
backend process-wide) builds the model, runs ``--warmup`` steps, then one counted step, then
``--steps`` timed ones, and reports per step (bench/counters.py says how each is counted):

- ``syncs``: ops that block the host on CUDA (.item(), bool(t), nonzero, unique, ...);
- ``kernels``: kernel-like aten ops (views, metadata and bare allocations left out), plus ``triton``
  launches (counted under TRITON_INTERPRET=1) for the Triton backend; ``kernels_total`` is their sum;
- ``flops``: torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention);
- ``peak_bytes``: the most tensor bytes live at once during the counted step, from the CPU allocator's
  every allocation and free since before the model was built: weights, gradients, optimizer state,
  activations and temporaries, exactly (not RSS);
- ``cpu_s``: median process CPU time of the timed steps (one thread; the machine is shared, so noisy); for
  GPT-2-small by default that of the counted step (counting costs tens of microseconds per op, against a
  step of tens of seconds);
- ``dpk_python_s``: for dpkernels modes, the CPU time of a step times the share of a profiled step spent in
  dpkernels' own Python (cProfile ``tottime``, the calls into torch left out), also per DP layer;
- ``peak_holders``: with ``--holders N``, the N largest groups of allocations live at the peak, by the op
  and the Python frames that made them (`MemoryTimeline.holders`), in the markdown too;
- ``graph_breaks``: with ``--compile``, the graph breaks torch._dynamo finds in the full step (forward,
  loss, the mode's backward, optimizer.step) (`torch._dynamo.explain`);

each beside non-DP of the same model and batch in the same run as ``<metric>_ratio``. Writes
overhead.json, overhead.md and overhead.png into --out (default bench/results/cpu/).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import json
import os
import pstats
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MARKER = "bench.overhead:counted_step"
TINY = ("gpt2-tiny", "bert-tiny", "resnet18-gn-tiny")
# (model, batch): the tiny models at B = 4, GPT-2-small at B = 2, 4, 8 with T = 256.
DEFAULT_CASES = [(m, 4) for m in TINY] + [("gpt2-small", b) for b in (2, 4, 8)]
DPK = ("dpk-bk", "dpk-two-pass", "dpk-layer-wise")
PEERS = ("opacus-hooks", "opacus-ghost", "fastdp-bk", "fastdp-mixopt")
METRICS = ("syncs", "kernels_total", "flops", "peak_bytes", "cpu_s")
FASTDP_DEFAULT = REPO / ".fastdp"  # where a local copy of fastDP's source may be unpacked (git-ignored)


def default_modes(model: str) -> list[str]:
    """Non-DP, the dpkernels strategies on the reference backend, on the Triton backend for the tiny transformers
    (the interpreter is far too slow for GPT-2-small and ResNet), and the peers (on GPT-2-small Opacus ghost
    and fastDP's base book-keeping only, the closest to dpkernels' all-layer book-keeping)."""
    modes = ["nondp", *(f"{m}:reference" for m in DPK)]
    if model in ("gpt2-tiny", "bert-tiny"):  # the interpreter runs convolutions far too slowly
        modes += [f"{m}:triton" for m in DPK]
    if model not in TINY:  # CPU time bounded: one peer mode each (Opacus hooks alone stores B per-sample grads)
        return modes + ["opacus-ghost", "fastdp-bk"]
    return modes + list(PEERS)


# ----------------------------------------------------------------------------- one case, in this process


def _dpk_python_share(step: Any) -> float:
    """The share of one step's profiled time spent in dpkernels' own Python (cProfile tottime of functions in
    dpkernels/: the torch calls they make are left out). cProfile slows Python calls more than torch's kernels,
    so the share is an upper estimate."""
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    root = str(REPO / "dpkernels")
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    return sum(v[2] for (filename, _, _), v in stats.items() if filename.startswith(root)) / max(total, 1e-12)


def _graph_breaks(step: Any) -> dict[str, Any]:
    import torch._dynamo

    torch._dynamo.reset()
    ex = torch._dynamo.explain(step)()
    reasons = [str(getattr(b, "reason", b)).splitlines()[0][:200] for b in ex.break_reasons]
    return {"graph_breaks": ex.graph_break_count, "graphs": ex.graph_count, "break_reasons": reasons[:20]}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case here; a failure of the mode becomes a result with status "error" (never raises)."""
    res: dict[str, Any] = {k: spec[k] for k in ("model", "batch", "mode")}
    phase = "import"
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from . import modes
        from .counters import MemoryTimeline, StepCounter, count_triton_launches
        from .models import build

        torch.set_num_threads(int(spec.get("threads") or 1))
        modes.imports(spec["mode"], spec.get("fastdp_path"))
        phase = "setup"
        gc.collect()  # with --inline, what earlier cases left must not be freed inside this timeline
        with MemoryTimeline(stacks=bool(spec.get("holders"))) as timeline:
            work = build(spec["model"], spec["batch"], "cpu", seed=0)
            ctx = modes.Context(device="cpu", batch=spec["batch"], fastdp_path=spec.get("fastdp_path"))
            runner = modes.setup(spec["mode"], work, ctx)
            model, opt = runner.model, runner.optimizer

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                loss = work.loss(model(work.x), runner.criterion)
                runner.backward(loss)
                opt.step()

            phase = "warmup"
            for _ in range(spec["warmup"]):
                step()
            gc.collect()
            phase = "counted"
            counter, flops = StepCounter(), FlopCounterMode(display=False)
            with torch.profiler.record_function(MARKER), count_triton_launches() as launches, flops, counter:
                t0 = time.process_time()
                step()
                counted_s = time.process_time() - t0
        phase = "timed"
        times = []
        for _ in range(spec["steps"]):
            t0 = time.process_time()
            step()
            times.append(time.process_time() - t0)
        mem = timeline.peak(MARKER)
        if spec.get("holders"):
            res["peak_holders"] = timeline.holders(MARKER, top=int(spec["holders"]))
        res.update(
            syncs=sum(counter.syncs.values()),
            sync_ops=dict(counter.syncs),
            kernels=sum(counter.kernels.values()),
            triton=sum(launches.values()),
            kernels_total=sum(counter.kernels.values()) + sum(launches.values()),
            non_kernel_ops=sum(counter.other.values()),
            custom_ops=dict(counter.custom),
            top_kernels=dict(counter.kernels.most_common(12)),
            flops=flops.get_total_flops(),
            peak_bytes=mem["peak_bytes"],
            start_bytes=mem["start_bytes"],
            param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            cpu_s=statistics.median(times) if times else counted_s,
            cpu_times_s=times,
            cpu_s_from="timed steps" if times else "the counted step (no timed steps asked for)",
        )
        if modes.family(spec["mode"]) == "dpkernels" and times:
            layers = len(opt.engine.modules)
            py = _dpk_python_share(step) * (res["cpu_s"] or 0.0)
            res.update(dp_layers=layers, dpk_python_s=py, dpk_python_per_layer_s=py / max(1, layers))
        if spec.get("compile"):
            phase = "compile"
            res.update(_graph_breaks(step))
        res["status"] = "ok"
    except Exception as exc:  # a mode failing on a model is a result, not a crash
        res.update(status="error", phase=phase, error=f"{type(exc).__name__}: {exc}"[:2000])
        res["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if "dpkernels" in sys.modules:
            sys.modules["dpkernels"].set_backend(None)
    return res


# ----------------------------------------------------------------------------- the run


def _worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """`measure` in a fresh interpreter (TRITON_INTERPRET=1 for a Triton mode); a crash becomes an error result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if spec["mode"].endswith(":triton"):
        env["TRITON_INTERPRET"] = "1"
    base = {k: spec[k] for k in ("model", "batch", "mode")}
    with tempfile.TemporaryDirectory(prefix="dpk-overhead-") as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "bench.overhead", "--worker", json.dumps(spec), path]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**base, "status": "error", "phase": "timeout", "error": f"killed after {timeout:.0f} s"}
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        tail = (proc.stderr or proc.stdout or "")[-600:].strip()
        return {**base, "status": "error", "phase": "process", "error": f"exit {proc.returncode}: {tail}"}


def add_ratios(results: list[dict[str, Any]]) -> None:
    """``<metric>_ratio`` of every ok result against the ok non-DP result of the same (model, batch)."""
    base = {(r["model"], r["batch"]): r for r in results if r["mode"] == "nondp" and r["status"] == "ok"}
    for r in results:
        for m in METRICS:
            r.pop(f"{m}_ratio", None)
        b = base.get((r["model"], r["batch"]))
        if r["status"] != "ok" or b is None:
            continue
        for m in METRICS:
            if r.get("triton") and m in ("flops", "cpu_s"):  # not comparable: see `markdown`
                continue
            if r.get(m) is not None and b.get(m):
                r[f"{m}_ratio"] = r[m] / b[m]  # none for syncs where non-DP has none


def _f(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        "# Per-step overhead of DP training, counted on the CPU",
        "",
        " ".join(f"`{run['command']}` ({run['timestamp']})" for run in meta.get("runs", [meta]))
        + f", torch {meta['torch']}, {meta['device_name']}, "
        f"{meta['threads']} thread. Each figure is for one step (x: over non-DP of the same model and batch, "
        "same run). Op counts, FLOPs and bytes hold on any device; CPU times are noisy (shared machine) and say "
        "nothing about a GPU. How each is counted: `bench/overhead.py`, `bench/counters.py`. Triton rows: "
        "kernel-like ops = aten ops + Triton launches; their FLOPs are the aten ops' only (FlopCounterMode does "
        "not see inside a Triton kernel) and their CPU time is the interpreter's, so neither has a ratio.",
        "",
        "| model | B | mode | syncs | kernel-like ops | x | Triton launches | GFLOP | x | peak MiB | x "
        "| CPU ms | x | dpkernels Python ms (per DP layer) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['model']} | {r['batch']} | {r['mode']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r.get('error', '')[:160].replace('|', '/')} ||||||||||")
            continue
        py = r.get("dpk_python_s")
        py_s = "-" if py is None else f"{py * 1e3:.1f} ({r['dpk_python_per_layer_s'] * 1e3:.2f})"
        cpu = r.get("cpu_s")
        lines.append(
            f"{head} {r['syncs']} | {r['kernels_total']} | {_f(r.get('kernels_total_ratio'), '.2f')} | "
            f"{r['triton'] or '-'} | {r['flops'] / 1e9:.3f} | {_f(r.get('flops_ratio'), '.2f')} | "
            f"{r['peak_bytes'] / 2**20:.1f} | {_f(r.get('peak_bytes_ratio'), '.3f')} | "
            f"{'-' if cpu is None else f'{cpu * 1e3:.1f}'} | {_f(r.get('cpu_s_ratio'), '.2f')} | {py_s} |"
        )
    held = [r for r in results if r.get("status") == "ok" and r.get("peak_holders")]
    if held:
        lines += ["", "## What is live at the peak (MiB, by the op and Python frames that allocated it)", ""]
        for r in held:
            lines.append(f"- {r['model']} B={r['batch']} {r['mode']}, peak {r['peak_bytes'] / 2**20:.1f} MiB:")
            lines += [f"  - {h['mib']:.1f} {h['when']}: `{h['site']}`" for h in r["peak_holders"]]
    breaks = [r for r in results if r.get("status") == "ok" and "graph_breaks" in r]
    if breaks:
        lines += ["", "## Graph breaks of the compiled full step (torch._dynamo.explain)", ""]
        lines += ["| model | B | mode | graphs | breaks | first reasons |", "|---|---|---|---|---|---|"]
        for r in breaks:
            why = "; ".join(dict.fromkeys(r["break_reasons"]))[:300].replace("|", "/")
            lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['graphs']} | {r['graph_breaks']} | {why} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """One panel per ratio (kernel-like ops, FLOPs, peak memory, CPU time); a group of bars per (model, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["model"], r["batch"]) for r in results))
    modes = [m for m in dict.fromkeys(r["mode"] for r in results) if m != "nondp"]
    by = {(r["model"], r["batch"], r["mode"]): r for r in results}
    panels = [("kernels_total_ratio", "kernel-like ops"), ("flops_ratio", "FLOPs"),
              ("peak_bytes_ratio", "peak tensor memory"), ("cpu_s_ratio", "CPU time")]  # fmt: skip
    width = 0.8 / max(1, len(modes))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 1.2 * len(keys) * max(1, len(modes)) * 0.25), 11),
                             squeeze=False, layout="constrained")  # fmt: skip
    cmap = plt.get_cmap("tab20")
    for ax, (metric, title) in zip(axes[:, 0], panels, strict=True):
        for j, mode in enumerate(modes):
            xs, ys = [], []
            for i, (m, b) in enumerate(keys):
                r = by.get((m, b, mode))
                if r is not None and r.get(metric) is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r[metric])
            ax.bar(xs, ys, width=width, label=mode, color=cmap(j % 20))
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{m}\nB={b}" for m, b in keys], fontsize=7)
        ax.set_ylabel(f"{title}\n(x non-DP)", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Per-step cost of DP training over non-DP, counted on the CPU", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    p.add_argument(
        "--cases", default="", help="comma list of model:batch (default: tiny models B=4, gpt2-small B=2,4,8)"
    )
    p.add_argument("--modes", default="", help="comma list of modes (default: every mode that fits the model)")
    p.add_argument("--warmup", type=int, default=1, help="untimed, uncounted steps first (caches built)")
    p.add_argument("--steps", type=int, default=3, help="timed steps on the tiny models")
    p.add_argument(
        "--big-steps", type=int, default=0,
        help="timed steps on the other models (0: the counted step's CPU time, where counting costs < 1%%)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also count graph breaks of the compiled full step")
    p.add_argument("--fastdp-path", default=str(FASTDP_DEFAULT) if (FASTDP_DEFAULT / "fastDP").is_dir() else None)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu"))
    p.add_argument("--name", default="overhead", help="output file stem")
    p.add_argument("--inline", action="store_true", help="every case in this process (tests; memory stays exact)")
    p.add_argument("--quick", action="store_true", help="gpt2-tiny B=2, non-DP and dpk-bk:reference only (CI)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--merge", nargs="+", default=None, help="write one table and plot from these runs' JSON files")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument(
        "--holders", type=int, default=0,
        help="also list the N largest groups of allocations live at each case's peak, by the op and Python frames "
        "that made them (profiles with stacks: slower, so the CPU times of such a run are not comparable)",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        res = measure(json.loads(argv[1]))
        with open(argv[2], "w") as f:
            json.dump(res, f)
        return 0
    args = parser().parse_args(argv)
    if args.merge:  # the results of earlier runs, in one table and plot (ratios stay those of their own run)
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = [r for run in runs for r in run["results"]]
        add_ratios(merged)  # each run has its own (model, batch) cases, so each ratio is within its run
        md = write(args, argv, merged, plot_too=not args.no_plot, runs=[run["meta"] for run in runs])
        print(md)
        return 0
    from tqdm import tqdm

    from . import modes as M

    if args.quick:
        cases = [("gpt2-tiny", 2)]
    elif args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",") if c]
    else:
        cases = DEFAULT_CASES
    todo = []
    for model, batch in cases:
        wanted = [m for m in args.modes.split(",") if m] or default_modes(model)
        if args.quick:
            wanted = ["nondp", "dpk-bk:reference"]
        if "nondp" in wanted:
            wanted = ["nondp", *(m for m in wanted if m != "nondp")]
        for mode in wanted:
            todo.append((model, batch, mode))
    if args.inline and any(m.endswith(":triton") for _, _, m in todo):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (by dpkernels' backend)
    results = []
    bar = tqdm(todo, desc="overhead", unit="case", file=sys.stderr)
    for model, batch, mode in bar:
        bar.set_postfix_str(f"{model} B={batch} {mode}")
        if M.family(mode) == "fastdp" and not args.fastdp_path:
            results.append({"model": model, "batch": batch, "mode": mode, "status": "skipped",
                            "error": M.FASTDP_SKIP})  # fmt: skip
            continue
        spec = {
            "model": model, "batch": batch, "mode": mode, "warmup": args.warmup, "threads": args.threads,
            "steps": args.steps if model in TINY else args.big_steps, "fastdp_path": args.fastdp_path,
            "compile": args.compile, "holders": args.holders,
        }  # fmt: skip
        results.append(measure(spec) if args.inline else _worker(spec, args.timeout))
        add_ratios(results)
        write(args, argv, results, plot_too=False)  # what is done so far, should a later case not finish
    md = write(args, argv, results, plot_too=not args.no_plot)
    print(md)
    return 0


def write(
    args: argparse.Namespace,
    argv: Sequence[str],
    results: list[dict[str, Any]],
    plot_too: bool,
    runs: list[dict[str, Any]] | None = None,
) -> str:
    import torch

    from . import modes as M
    from .run import cpu_name, fastdp_version

    meta = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.overhead " + " ".join(shlex.quote(a) for a in argv),
        "torch": torch.__version__,
        "device_name": cpu_name(),
        "threads": args.threads,
        "warmup": args.warmup,
        "optimizer": "SGD(lr=1e-4)",
        "privacy": f"noise_multiplier={M.NOISE_MULTIPLIER}, max_grad_norm={M.MAX_GRAD_NORM}, flat clipping, mean loss",
        "fastdp": fastdp_version(args.fastdp_path) if args.fastdp_path else None,
    }
    if runs:
        meta["runs"] = runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(meta, results)
    (out / f"{args.name}.md").write_text(md)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    if plot_too:
        plot(results, out / f"{args.name}.png")
    return md


if __name__ == "__main__":
    sys.exit(main())
