"""CPU step time of DP training on the compiled backend's CPU path against the reference:
``python -m bench.cuda_cpu [--steps N] [--out FILE] [--quick]``.

The demo CNN (dpkernels.demo.make_cnn on 8x8 digits, batch 64) and gpt2-tiny (bench.models, batch 4 and
32), make_private(strategy="bk"), one thread; each backend's median of ``--steps`` steps after warm-up.
Then the Linear and Conv2d clipped sums alone on their three CPU implementations (the reference, the
compiled backend's ATen path, its tile kernel run on the CPU), and the Conv2d norms the same way, rounds
interleaved so that the ratios share the machine's state. The result decides the automatic backend order on the CPU
(dpkernels.ops._auto) and the compiled backend's CPU paths of the clipped sums (csrc/linear_clipped_sum.cpp,
csrc/conv.cpp). ``--linear-only cuda`` times those tables on a GPU, with Triton (there the conv norms'
tiles are the automatic path).
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
# (B, C_in, H, W, C_out, k, stride) of the Conv2d clipped sum: the demo CNN's two convs at B=64, a
# ResNet-style 3x3 layer
CONV_SHAPES = [(64, 1, 8, 8, 16, 3, 1), (64, 16, 8, 8, 32, 3, 2), (32, 64, 16, 16, 64, 3, 1)]


def _linear_impls(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> dict:
    from dpkernels.ops import reference as ref

    op = torch.ops.dpkernels.cuda_linear_clipped_sum
    kw = dict(bias=True, noise_std=1.0, seed_w=1, seed_b=2)
    impls = {
        "ref": lambda: ref.linear_clipped_sum(a, g, c, **kw),
        "aten": lambda: op(a, g, c, True, 1.0, 1.0, 1, 2, None, None, 2, 0),
        "tiles": lambda: op(a, g, c, True, 1.0, 1.0, 1, 2, None, None, 1, 0),
    }
    if a.is_cuda:
        from dpkernels.ops import triton as tr

        impls["triton"] = lambda: tr.linear_clipped_sum(a, g, c, **kw)
    return impls


def _conv_impls(x: torch.Tensor, g: torch.Tensor, c: torch.Tensor, ws: list[int], stride: int) -> dict:
    from dpkernels.ops import reference as ref

    op = torch.ops.dpkernels.cuda_conv_clipped_sum
    geo = [[stride], [ws[-1] // 2], [1], 1]
    kw = dict(weight_shape=ws, stride=stride, padding=ws[-1] // 2, dilation=1, groups=1, bias=True, noise_std=1.0)
    impls = {
        "ref": lambda: ref.conv_clipped_sum(x, g, c, **kw),
        "aten": lambda: op(x, g, c, ws, *geo, True, 1.0, 1.0, 1, 2, None, None, 2, 0),
        "tiles": lambda: op(x, g, c, ws, *geo, True, 1.0, 1.0, 1, 2, None, None, 1, 0),
    }
    if x.is_cuda:
        from dpkernels.ops import triton as tr

        impls["triton"] = lambda: tr.conv_clipped_sum(x, g, c, **kw)
    return impls


# (B, C_in, H, W, C_out, k, stride, method) of the Conv2d norms: the demo CNN's second conv at B=64 (T = 16:
# one Gram tile), a ResNet-style 3x3 layer both ways (T = 256: four 64-row tiles, ten pairs), a
# late 3x3 layer (T = 16, d = 2304) by instantiation (few tiles: split over t on a GPU)
CONV_NORM_SHAPES = [
    (64, 16, 8, 8, 32, 3, 2, "ghost"),
    (32, 64, 16, 16, 64, 3, 1, "ghost"),
    (32, 64, 16, 16, 64, 3, 1, "inst"),
    (8, 256, 4, 4, 256, 3, 1, "inst"),
]


def _conv_norm_impls(x: torch.Tensor, g: torch.Tensor, k: int, stride: int, method: str) -> dict:
    from dpkernels.ops import reference as ref

    op = torch.ops.dpkernels.cuda_conv_norms
    geo = [[stride], [k // 2], [1], 1]
    kw = dict(kernel_size=k, stride=stride, padding=k // 2, dilation=1, groups=1, bias=True, method=method)
    impls = {
        "ref": lambda: ref.conv_norms(x, g, **kw),
        "aten": lambda: op(x, g, [k], *geo, True, method, 2, 0),
        "tiles": lambda: op(x, g, [k], *geo, True, method, 1, 0),
    }
    if x.is_cuda:
        from dpkernels.ops import triton as tr

        impls["triton"] = lambda: tr.conv_norms(x, g, **kw)
    return impls


def _table(cases, rounds: int, device: str, head: str) -> list[str]:
    """Median ms per call of each implementation (rounds interleaved) and the tiles' GFLOP/s; ``cases``
    yields (label, impls, flops)."""
    names = ["ref", "aten", "tiles"] + (["triton"] if device == "cuda" else [])
    rows = [
        f"| {head} | "
        + " | ".join(f"{n} ms" for n in names)
        + " | "
        + " | ".join(f"{n} / ref" for n in names[1:])
        + " | tiles GFLOP/s |",
        "|---|" + "---|" * (2 * len(names)),
    ]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for label, impls, flops in cases:
        times: dict[str, list[float]] = {k: [] for k in impls}
        for _ in range(rounds + 1):  # the first round warms up
            for k, fn in impls.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
        rows.append(
            f"| {label} | "
            + " | ".join(f"{med[n]:.3f}" for n in names)
            + " | "
            + " | ".join(f"{med[n] / med['ref']:.2f}" for n in names[1:])
            + f" | {flops / (med['tiles'] * 1e-3) / 1e9:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def linear_clipped_sum_times(rounds: int, device: str = "cpu") -> list[str]:
    """Median ms per call of the Linear clipped sum (float32, bias, noise): the reference, the compiled
    backend's ATen path and its tiles (on CUDA also Triton), and the tiles' GFLOP/s (2 B T d p)."""

    def cases():
        for B, T, d, p in LINEAR_SHAPES:
            gen = torch.Generator().manual_seed(0)
            a, g = torch.randn(B, T, d, generator=gen), torch.randn(B, T, p, generator=gen)
            c = torch.rand(B, generator=gen)
            yield f"{B}, {T}, {d}, {p}", _linear_impls(a.to(device), g.to(device), c.to(device)), 2 * B * T * d * p

    return _table(cases(), rounds, device, "B, T, d, p")


def conv_clipped_sum_times(rounds: int, device: str = "cpu") -> list[str]:
    """The same for the Conv2d clipped sum (padding k // 2); GFLOP/s 2 B O C_out C_in k^2."""

    def cases():
        for B, cin, H, W, cout, k, s in CONV_SHAPES:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(B, cin, H, W, generator=gen)
            Ho, Wo = (H + 2 * (k // 2) - k) // s + 1, (W + 2 * (k // 2) - k) // s + 1
            g, c = torch.randn(B, cout, Ho, Wo, generator=gen), torch.rand(B, generator=gen)
            impls = _conv_impls(x.to(device), g.to(device), c.to(device), [cout, cin, k, k], s)
            yield f"{B}, {cin}, {H}x{W}, {cout}, {k}, {s}", impls, 2 * B * Ho * Wo * cout * cin * k * k

    return _table(cases(), rounds, device, "B, C_in, HxW, C_out, k, stride")


def conv_norms_times(rounds: int, device: str = "cpu") -> list[str]:
    """The same for the Conv2d norms (padding k // 2, bias): the reference and the compiled backend's
    ATen path (the unfold materialised per chunk) and its implicit-GEMM tiles (never written); GFLOP/s
    of the tiles as they count them: ghost B T^2 (d + p) (half of the two Grams: symmetry), inst 2 B T d p."""

    def cases():
        for B, cin, H, W, cout, k, s, method in CONV_NORM_SHAPES:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(B, cin, H, W, generator=gen)
            Ho, Wo = (H + 2 * (k // 2) - k) // s + 1, (W + 2 * (k // 2) - k) // s + 1
            g = torch.randn(B, cout, Ho, Wo, generator=gen)
            T, d = Ho * Wo, cin * k * k
            flops = B * T * T * (d + cout) if method == "ghost" else 2 * B * T * d * cout
            impls = _conv_norm_impls(x.to(device), g.to(device), k, s, method)
            yield f"{B}, {cin}, {H}x{W}, {cout}, {k}, {s}, {method}", impls, flops

    return _table(cases(), rounds, device, "B, C_in, HxW, C_out, k, stride, method")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="bench/results/cuda_cpu_vs_reference.md")
    p.add_argument("--quick", action="store_true", help="2 steps of the demo CNN and 2 rounds of the ops (smoke test)")
    p.add_argument(
        "--linear-only",
        metavar="DEVICE",
        help="only the Linear and Conv clipped sum and Conv norm tables, on DEVICE (cpu, cuda)",
    )
    args = p.parse_args()
    if args.quick:
        args.steps = 2
    import dpkernels.ops.cuda  # noqa: F401  (builds the library on first use, outside the timings)

    if args.linear_only:
        rounds = 2 if args.quick else 4 * args.steps
        rows = linear_clipped_sum_times(rounds, args.linear_only)
        rows += ["", "Conv2d clipped sum:", ""] + conv_clipped_sum_times(rounds, args.linear_only)
        rows += ["", "Conv2d norms (no noise):", ""] + conv_norms_times(rounds, args.linear_only)
        name = torch.cuda.get_device_name() if args.linear_only == "cuda" else "CPU"
        Path(args.out).write_text(
            f"# Linear and Conv2d clipped sums and Conv2d norms on {name}: the compiled backend's paths\n\n"
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
    rows += ["", "Conv2d clipped sum alone (float32, bias, noise; median per call):", ""]
    rows += conv_clipped_sum_times(2 if args.quick else 4 * args.steps)
    rows += ["", "Conv2d norms alone (float32, bias; median per call):", ""]
    rows += conv_norms_times(2 if args.quick else 4 * args.steps)
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
