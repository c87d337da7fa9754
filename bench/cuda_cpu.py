"""CPU step time of DP training on the compiled backend's CPU path against the reference:
``python -m bench.cuda_cpu [--steps N] [--out FILE] [--quick]``.

The demo CNN (dpkernels.demo.make_cnn on 8x8 digits, batch 64) and gpt2-tiny (bench.models, batch 4 and
32), make_private(strategy="bk"), one thread; each backend's median of ``--steps`` steps after warm-up.
Then the Linear clipped sum alone on its three CPU implementations (the reference, the compiled
backend's ATen path, its tile kernel run on the CPU), rounds interleaved so that the ratios share the
machine's state. The result decides the automatic backend order on the CPU (dpkernels.ops._auto) and
the compiled backend's CPU path for the Linear clipped sum (csrc/linear_clipped_sum.cpp).
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


# (B, T, d, p) of the Linear clipped sum: a gpt2-tiny MLP layer at B=32, its attention projection at
# B=4, the demo CNN's classifier head, a long sequence with a small output (split-K on a GPU)
LINEAR_SHAPES = [(32, 64, 128, 512), (4, 64, 128, 128), (64, 1, 128, 10), (8, 512, 64, 64)]


def _impls(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> dict:
    from dpkernels.ops import reference as ref

    op = torch.ops.dpkernels.cuda_linear_clipped_sum
    impls = {
        "ref": lambda: ref.linear_clipped_sum(a, g, c, bias=True, noise_std=1.0, seed_w=1, seed_b=2),
        "aten": lambda: op(a, g, c, True, 1.0, 1.0, 1, 2, None, None, 2, 0),
        "tiles": lambda: op(a, g, c, True, 1.0, 1.0, 1, 2, None, None, 1, 0),
    }
    if a.is_cuda:
        from dpkernels.ops import triton as tr

        impls["triton"] = lambda: tr.linear_clipped_sum(a, g, c, bias=True, noise_std=1.0, seed_w=1, seed_b=2)
    return impls


def linear_clipped_sum_times(rounds: int, device: str = "cpu") -> list[str]:
    """Median ms per call of the implementations of the Linear clipped sum (float32, bias, noise): the
    reference, the compiled backend's ATen path and its tiles (on CUDA also Triton), and GFLOP/s (2 B T d p)."""
    names = ["ref", "aten", "tiles"] + (["triton"] if device == "cuda" else [])
    rows = [
        "| B, T, d, p | "
        + " | ".join(f"{n} ms" for n in names)
        + " | "
        + " | ".join(f"{n} / ref" for n in names[1:])
        + " | tiles GFLOP/s |",
        "|---|" + "---|" * (2 * len(names)),
    ]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for B, T, d, p in LINEAR_SHAPES:
        gen = torch.Generator().manual_seed(0)
        a, g = torch.randn(B, T, d, generator=gen), torch.randn(B, T, p, generator=gen)
        impls = _impls(a.to(device), g.to(device), torch.rand(B, generator=gen).to(device))
        times: dict[str, list[float]] = {k: [] for k in impls}
        for _ in range(rounds + 1):  # the first round warms up
            for k, fn in impls.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
        gflops = 2 * B * T * d * p / (med["tiles"] * 1e-3) / 1e9
        rows.append(
            f"| {B}, {T}, {d}, {p} | "
            + " | ".join(f"{med[n]:.3f}" for n in names)
            + " | "
            + " | ".join(f"{med[n] / med['ref']:.2f}" for n in names[1:])
            + f" | {gflops:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="bench/results/cuda_cpu_vs_reference.md")
    p.add_argument("--quick", action="store_true", help="2 steps of the demo CNN and 2 rounds of the ops (smoke test)")
    p.add_argument("--linear-only", metavar="DEVICE", help="only the Linear clipped sum table, on DEVICE (cpu, cuda)")
    args = p.parse_args()
    if args.quick:
        args.steps = 2
    import dpkernels.ops.cuda  # noqa: F401  (builds the library on first use, outside the timings)

    if args.linear_only:
        rows = linear_clipped_sum_times(2 if args.quick else 4 * args.steps, args.linear_only)
        name = torch.cuda.get_device_name() if args.linear_only == "cuda" else "CPU"
        Path(args.out).write_text(
            f"# Linear clipped sum on {name}: the compiled backend's paths\n\n"
            f"`python -m bench.cuda_cpu --linear-only {args.linear_only}`, torch {torch.__version__}, median per "
            "call, float32 inputs, bias, noise.\n\n" + "\n".join(rows) + "\n"
        )
        print(f"wrote {args.out}")
        return
    torch.set_num_threads(1)

    rows = ["| workload | reference ms | cuda (CPU path) ms | cuda / reference |", "|---|---|---|---|"]
    for name, make in list(_workloads())[: 1 if args.quick else None]:
        med = {b: statistics.median(step_times(make, b, args.steps)) * 1e3 for b in ("reference", "cuda")}
        rows.append(f"| {name} | {med['reference']:.2f} | {med['cuda']:.2f} | {med['cuda'] / med['reference']:.2f} |")
        print(rows[-1], flush=True)
    rows += ["", "Linear clipped sum alone (float32, bias, noise; median per call):", ""]
    rows += linear_clipped_sum_times(2 if args.quick else 4 * args.steps)
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
