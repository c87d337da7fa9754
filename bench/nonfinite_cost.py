"""What one DP step costs under make_private(nonfinite=...): kernel-like aten ops and the peak of live tensor bytes.

    python -m bench.nonfinite_cost [--cases gpt2-tiny:4,resnet18-gn-tiny:4,gpt2-small:1] [--backend reference]

Each case runs a warm-up step and one counted step (bench.counters: `StepCounter` kernel-like ops, `MemoryTimeline`
peak over the counted step) with nonfinite="raise" (the default) and "drop". The rule the clipped sums follow in
both modes (a row whose clip factor is 0 adds exactly 0: dpkernels.ops.reference._common.kept) is in both numbers;
compare with a checkout before it for its own cost. The loss is the per-sample mean cross-entropy, given to
optimizer.backward as (B,) per-sample losses. Counts hold on any device; no times are reported.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import dpkernels

from .counters import MemoryTimeline, StepCounter
from .models import build

MARKER = "nonfinite_cost.counted"


def measure(name: str, batch: int, backend: str, nonfinite: str) -> dict:
    with MemoryTimeline() as timeline:
        work = build(name, batch, "cpu", seed=0)
        model, opt = dpkernels.make_private(
            work.model, torch.optim.SGD(work.model.parameters(), lr=0.1), noise_multiplier=1.0,
            expected_batch_size=float(batch), seed=0, backend=backend, nonfinite=nonfinite,
        )  # fmt: skip

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            out = model(work.x)
            losses = F.cross_entropy(out.reshape(-1, out.shape[-1]), work.y.reshape(-1), reduction="none")
            opt.backward(losses.view(batch, -1).mean(1))
            opt.step()

        step()
        counter = StepCounter()
        with torch.profiler.record_function(MARKER), counter:
            step()
    return {
        "kernels": sum(counter.kernels.values()),
        "syncs": sum(counter.syncs.values()),
        "peak_MiB": timeline.peak(MARKER)["peak_bytes"] / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="gpt2-tiny:4,resnet18-gn-tiny:4")
    ap.add_argument("--backend", default="reference")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("model | B | nonfinite | kernel-like ops | host syncs | peak MiB")
    for case in args.cases.split(","):
        name, batch = case.split(":")
        for mode in ("raise", "drop"):
            r = measure(name, int(batch), args.backend, mode)
            print(f"{name} | {batch} | {mode} | {r['kernels']} | {r['syncs']} | {r['peak_MiB']:.2f}")


if __name__ == "__main__":
    main()
