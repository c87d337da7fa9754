"""Cost of make_private(secure_mode=True) against the default mode, on the CPU.

Two measurements, each mode against the other in the same run (ratios, never absolute claims):

- the noise op alone, per element: the default ``add_noise`` (reference: torch.Generator's randn; the
  compiled backend's CPU build: Philox4x32-10 + Box-Muller in float32) against ``secure_noise``
  (ChaCha20 + four Box-Muller draws in float64) on the same backends;
- a whole DP step (forward, backward, clipped sums, noise, optimizer step) of GPT-2-shaped models in
  each mode on the reference backend: CPU time per step (median) and the aten ops a step runs (counted
  with a TorchDispatchMode: the secure noise is a fixed ~1000 tensor ops per 2^16-element chunk of a
  parameter on the reference, one op per parameter on Triton and csrc).

    PYTHONPATH=. python bench/secure_noise.py            # writes bench/results/cpu/secure_noise.{json,md}
    PYTHONPATH=. python bench/secure_noise.py --quick    # tiny sizes, the CI smoke test

One intra-op thread (the numbers are per core; the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dpkernels
from dpkernels import ops

OUT = Path(__file__).resolve().parent / "results" / "cpu"


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _median_cpu_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def bench_op(n: int, repeats: int, backends: list[str]) -> list[dict[str, Any]]:
    key, nonce = list(range(8)), [0, 0, 0]
    prev = torch.randn(n)
    rows = []
    for backend in backends:
        default = _median_cpu_s(
            lambda b=backend: ops.add_noise(prev, (n,), noise_std=1.0, scale=0.5, seed=1, device="cpu", backend=b),
            repeats,
        )
        secure = _median_cpu_s(
            lambda b=backend: ops.secure_noise(
                prev, (n,), noise_std=1.0, scale=0.5, key=key, nonce=nonce, device="cpu", backend=b
            ),
            repeats,
        )
        rows.append(
            dict(
                backend=backend,
                elements=n,
                default_ns_per_element=1e9 * default / n,
                secure_ns_per_element=1e9 * secure / n,
                ratio=secure / default,
            )
        )
    return rows


def _step(work, model, opt) -> None:
    opt.zero_grad()
    work.loss(model(work.x)).backward()
    opt.step()


def bench_step(name: str, overrides: dict[str, Any], batch: int, steps: int) -> dict[str, Any]:
    from bench.models import build

    out: dict[str, Any] = dict(model=name, overrides=overrides, batch=batch)
    for secure in (False, True):
        work = build(name, batch, **overrides)
        model = work.model
        model, opt = dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
            expected_batch_size=float(batch), secure_mode=secure, backend="reference",
        )  # fmt: skip
        _step(work, model, opt)  # warm-up
        counter = _CountOps()
        with counter:
            _step(work, model, opt)
        cpu = _median_cpu_s(lambda w=work, m=model, o=opt: _step(w, m, o), steps)
        tag = "secure" if secure else "default"
        out[f"{tag}_cpu_s_per_step"] = cpu
        out[f"{tag}_aten_ops_per_step"] = sum(counter.ops.values())
        out["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out["param_tensors"] = sum(1 for p in model.parameters() if p.requires_grad)
    out["ratio"] = out["secure_cpu_s_per_step"] / out["default_cpu_s_per_step"]
    return out


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Secure noise vs default noise (CPU, one thread)",
        "",
        f"`{data['meta']['command']}` — torch {data['meta']['torch']}, {data['meta']['cpu']}",
        "",
        "## The noise op, per element (median CPU time; prev given, float32 output)",
        "",
        "| backend | elements | default ns/elem | secure ns/elem | secure / default |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in data["op"]:
        lines.append(
            f"| {r['backend']} | {r['elements']} | {r['default_ns_per_element']:.1f} | "
            f"{r['secure_ns_per_element']:.1f} | {r['ratio']:.1f}x |"
        )
    lines += [
        "",
        "## A DP step (reference backend; median CPU time, aten ops of one step)",
        "",
        "| model | params (tensors) | batch | default s/step | secure s/step | secure / default "
        "| default ops/step | secure ops/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["step"]:
        name = r["model"] + (f" {r['overrides']}" if r["overrides"] else "")
        lines.append(
            f"| {name} | {r['params']} ({r['param_tensors']}) | {r['batch']} | {r['default_cpu_s_per_step']:.3f} | "
            f"{r['secure_cpu_s_per_step']:.3f} | {r['ratio']:.2f}x | {r['default_aten_ops_per_step']} | "
            f"{r['secure_aten_ops_per_step']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CI smoke test)")
    ap.add_argument("--out", type=Path, default=None, help=f"results folder (default {OUT}; --quick: none)")
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled backend (it builds on first use)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    backends = ["reference"]
    if not args.no_compiled and "cuda" in ops.available_backends():
        backends.append("cuda")
    if args.quick:
        op_rows = bench_op(1 << 8, 1, backends)
        step_rows = [bench_step("gpt2-tiny", {}, 2, 1)]
    else:
        op_rows = bench_op(1 << 20, 5, backends)
        step_rows = [
            bench_step("gpt2-tiny", {}, 4, 10),
            bench_step("gpt2-tiny", dict(d=128, vocab=4096, layers=2, heads=4), 8, 5),
        ]
    data = dict(
        meta=dict(
            command="python bench/secure_noise.py" + (" --quick" if args.quick else ""),
            torch=torch.__version__,
            cpu=platform.processor() or platform.machine(),
            cores=os.cpu_count(),
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        ),
        op=op_rows,
        step=step_rows,
    )
    md = markdown(data)
    print(md)
    out = args.out if args.out is not None else (None if args.quick else OUT)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "secure_noise.json").write_text(json.dumps(data, indent=1) + "\n")
        (out / "secure_noise.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
