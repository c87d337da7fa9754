"""CPU step time of DP training on the compiled backend's CPU path against the reference:
``python -m bench.cuda_cpu [--steps N] [--out FILE]``.

The demo CNN (dpkernels.demo.make_cnn on 8x8 digits, batch 64) and gpt2-tiny (bench.models, batch 4 and
32), make_private(strategy="bk"), one thread; each backend's median of ``--steps`` steps after warm-up.
The result decides the automatic backend order on the CPU (dpkernels.ops._auto).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dpkernels


def _workloads():
    from bench.models import build
    from dpkernels.demo import make_cnn

    g = torch.Generator().manual_seed(0)

    def cnn():
        torch.manual_seed(0)
        return make_cnn(), torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)

    yield "demo CNN B=64", cnn
    for b in (4, 32):

        def gpt(b=b):
            w = build("gpt2-tiny", b)
            return w.model, w.x, w.y

        yield f"gpt2-tiny B={b}", gpt


def step_times(make, backend: str, steps: int, warmup: int = 3) -> list[float]:
    model, x, y = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=len(x), seed=0, backend=backend
    )
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="bench/results/cuda_cpu_vs_reference.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = ["| workload | reference ms | cuda (CPU path) ms | cuda / reference |", "|---|---|---|---|"]
    for name, make in _workloads():
        med = {b: statistics.median(step_times(make, b, args.steps)) * 1e3 for b in ("reference", "cuda")}
        rows.append(f"| {name} | {med['reference']:.2f} | {med['cuda']:.2f} | {med['cuda'] / med['reference']:.2f} |")
        print(rows[-1], flush=True)
    head = (
        "# Compiled backend's CPU path vs the reference: DP step time (CPU)\n\n"
        f"`python -m bench.cuda_cpu --steps {args.steps}`: median step (forward, DP backward, step) of "
        f"make_private(strategy='bk'), one thread, torch {torch.__version__}. A shared, loaded 2-core machine: "
        "ratios are indicative.\n\n"
    )
    Path(args.out).write_text(head + "\n".join(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
