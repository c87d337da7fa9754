"""Adaptive (quantile) clipping on digits (Andrew, Thakkar, McMahan & Ramaswamy 2021).

    python -m bench.papers.adaptive_clipping            # the full run, minutes on a CPU core
    python -m bench.papers.adaptive_clipping --quick    # a smoke run (CI), seconds

The claims: (1) with make_private(..., adaptive_clipping=...) each clipping group's bound R_t follows
the target quantile gamma of its per-sample gradient norms, as those norms change during training,
from a start far off in either direction; (2) the private counts cost no extra epsilon beyond the
one target: the gradient's noise multiplier rises from sigma to (sigma^-2 - G (2 sigma_b)^-2)^-1/2;
(3) adaptive clipping from a badly chosen initial bound reaches about the accuracy of a well-tuned
fixed bound at the same epsilon, where the badly chosen fixed bound does not.

Digits (scikit-learn's 8x8 images, 75/25 split), an MLP 64-32-10 with layer-wise groups (G = 2), DP-SGD
with momentum at epsilon 3 (delta 1e-5), Poisson batches of expected size 64, sigma_b = E / 20 (the
paper's choice), gamma = 0.5, eta = 0.2. Every `--probe-every` steps the true per-sample norms of a
fixed probe set of 256 training images are taken per group (torch.func on a plain copy of the model:
a measurement, not part of the run) and their gamma-quantile is recorded next to R_t.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

import dpkernels
from dpkernels.data import poisson_loader

from ._common import DELTA, RESULTS, fmt, publish, pyplot, quiet_single_thread, spent_epsilon, spread
from .perturbed_clipping import load_digits, mlp

GROUPS = (("0.weight", "0.bias"), ("2.weight", "2.bias"))  # layer-wise groups of the MLP


def group_norms(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(G, n) per-sample gradient norms of the cross-entropy per layer-wise group (torch.func, plain copy)."""
    plain = mlp()
    plain.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    params = {n: p.detach() for n, p in plain.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(plain, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.stack([sum(g[k].flatten(1).double().square().sum(1) for k in names).sqrt() for names in GROUPS])


def run(
    data: tuple[TensorDataset, Tensor, Tensor], args: argparse.Namespace, *, R0: float, adaptive: bool, sigma: float,
    seed: int,
) -> dict[str, Any]:  # fmt: skip
    train_set, x_te, y_te = data
    n = len(train_set)
    q = args.batch / n
    steps = math.ceil(args.epochs / q)
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    spec = (
        dict(target_quantile=args.quantile, lr=args.eta, count_noise_multiplier=args.batch / 20) if adaptive else None
    )
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=sigma, max_grad_norm=[R0, R0], groups="layer-wise", sample_rate=q,
        dataset_size=n, seed=seed, adaptive_clipping=spec,
    )  # fmt: skip
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: args.probe]
    px, py = train_set.tensors[0][idx], train_set.tensors[1][idx]
    trace = []
    loader = poisson_loader(train_set, q, steps=steps, generator=torch.Generator().manual_seed(seed))
    for step, (xb, yb) in enumerate(loader):
        if adaptive and step % args.probe_every == 0:
            norms, R = group_norms(model, px, py), list(opt.max_grad_norm)
            true_q = torch.quantile(norms, args.quantile, dim=1).tolist()
            below = [float((norms[g] <= R[g]).double().mean()) for g in range(len(R))]
            trace.append({"step": step, "R": R, "quantile": true_q, "fraction_below": below})
        opt.backward(F.cross_entropy(model(xb), yb))
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return {
        "accuracy": acc,
        "epsilon": spent_epsilon(opt.accountant),
        "steps": steps,
        "grad_noise_multiplier": opt.engine.grad_noise_multiplier,
        "final_R": list(opt.max_grad_norm),
        "trace": trace,
    }


def experiment(args: argparse.Namespace) -> dict[str, Any]:
    data = load_digits()
    n = len(data[0])
    q = args.batch / n
    steps = math.ceil(args.epochs / q)
    sigma = dpkernels.get_noise_multiplier(args.epsilon, DELTA, q, steps)
    rec: dict[str, Any] = {"n_train": n, "sample_rate": q, "steps": steps, "noise_multiplier": sigma, "runs": []}
    configs = [(R0, False) for R0 in args.fixed] + [(R0, True) for R0 in args.start]
    t0 = time.perf_counter()
    for i, (R0, adaptive) in enumerate(configs):
        for seed in range(args.seeds):
            r = run(data, args, R0=R0, adaptive=adaptive, sigma=sigma, seed=seed)
            rec["runs"].append({"R0": R0, "adaptive": adaptive, "seed": seed, **r})
        if not args.quiet:
            accs = [r["accuracy"] for r in rec["runs"] if (r["R0"], r["adaptive"]) == (R0, adaptive)]
            what = "adaptive from" if adaptive else "fixed"
            print(f"  [{i + 1}/{len(configs)}] {what} R={R0:g}: accuracy {fmt(spread(accs))}", file=sys.stderr)
    rec["points"] = [
        {
            "R0": R0,
            "adaptive": adaptive,
            "accuracy": spread([r["accuracy"] for r in rec["runs"] if (r["R0"], r["adaptive"]) == (R0, adaptive)]),
        }
        for R0, adaptive in configs
    ]
    # tracking: the fraction of the probe set's per-sample norms under R_t, per group, over each adaptive run's
    # second half (gamma if R_t sits at the quantile), and |log(R_t / q_gamma)|
    late = [t for r in rec["runs"] if r["adaptive"] for t in r["trace"][len(r["trace"]) // 2 :]]
    below = [f for t in late for f in t["fraction_below"]]
    errs = [abs(math.log(R / tq)) for t in late for R, tq in zip(t["R"], t["quantile"], strict=True)]
    rec["tracking_fraction_below"] = spread(below) if below else None
    rec["tracking_log_error"] = spread(errs) if errs else None
    rec["seconds"] = time.perf_counter() - t0
    return rec


def markdown(res: dict[str, Any]) -> str:
    cfg, d = res["config"], res["digits"]
    ad = [r for r in d["runs"] if r["adaptive"]]
    lines = [
        "# Adaptive clipping on digits (Andrew et al. 2021)",
        "",
        f"MLP 64-32-10, layer-wise groups (G = 2), {d['n_train']} training images, Poisson rate {d['sample_rate']:.4f} "
        f"(E = {cfg['batch']}), {d['steps']} steps, epsilon {cfg['epsilon']:g} at delta {DELTA:g}: noise multiplier "
        f"sigma = {d['noise_multiplier']:.4f} accounted; adaptive runs: gamma = {cfg['quantile']:g}, eta = "
        f"{cfg['eta']:g}, sigma_b = E / 20 = {cfg['batch'] / 20:g}, gradient noise multiplier "
        f"{ad[0]['grad_noise_multiplier']:.4f}"
        if ad
        else "",
        "",
        "| clipping | R (start) | test accuracy, % | epsilon spent |",
        "| --- | --- | --- | --- |",
    ]
    for p in d["points"]:
        runs = [r for r in d["runs"] if (r["R0"], r["adaptive"]) == (p["R0"], p["adaptive"])]
        eps = max(r["epsilon"] for r in runs)
        lines.append(f"| {'adaptive' if p['adaptive'] else 'fixed'} | {p['R0']:g} | {fmt(p['accuracy'])} | {eps:.3f} |")
    if d["tracking_log_error"] is not None:
        f, t = d["tracking_fraction_below"], d["tracking_log_error"]
        lines += [
            "",
            f"Tracking, over the second half of each adaptive run ({f['n']} probes x groups): the fraction of the "
            f"probe set's per-sample norms under R_t is {f['mean']:.3f} ± {f['std']:.3f} (target {cfg['quantile']:g}; "
            f"min {f['min']:.3f}, max {f['max']:.3f}); |log(R_t / q_gamma)|, q_gamma the probe set's true "
            f"{cfg['quantile']:g}-quantile, is {t['mean']:.2f} on average (max {t['max']:.2f}).",
        ]
    lines += ["", f"Seeds {cfg['seeds']} per row; {d['seconds']:.0f} s on the CPU."]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    d = res["digits"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = ("tab:blue", "tab:orange")
    for r in d["runs"]:
        if not r["adaptive"] or r["seed"] != 0 or not r["trace"]:
            continue
        steps = [t["step"] for t in r["trace"]]
        for g, c in enumerate(colours):
            a.plot(steps, [t["R"][g] for t in r["trace"]], color=c, label=f"R_t layer {g + 1} from R={r['R0']:g}")
            a.plot(steps, [t["quantile"][g] for t in r["trace"]], color=c, ls=":", lw=2,
                   label=f"true median norm layer {g + 1}" if r["R0"] == d["runs"][-1]["R0"] else None)  # fmt: skip
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("per-group bound / norm")
    a.set_title("Adaptive bounds R_t (solid) vs the true median per-sample norm (dotted)")
    a.legend(fontsize=7)
    labels = [f"{'adaptive' if p['adaptive'] else 'fixed'}\nR={p['R0']:g}" for p in d["points"]]
    means = [100 * p["accuracy"]["mean"] for p in d["points"]]
    stds = [100 * p["accuracy"]["std"] for p in d["points"]]
    b.bar(range(len(means)), means, yerr=stds, color=["tab:gray" if not p["adaptive"] else "tab:green"
                                                        for p in d["points"]])  # fmt: skip
    b.set_xticks(range(len(means)), labels, fontsize=8)
    b.set_ylabel("test accuracy, %")
    b.set_title(f"Test accuracy at epsilon {res['config']['epsilon']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.papers.adaptive_clipping", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps, 1 seed: a smoke run")
    p.add_argument("--seeds", type=int, default=3, help="runs per point (seeds 0..k-1)")
    p.add_argument("--epsilon", type=float, default=3.0, help=f"target epsilon at delta={DELTA:g}")
    p.add_argument("--fixed", type=float, nargs="+", default=[0.05, 1.0, 20.0], help="fixed bounds per group")
    p.add_argument("--start", type=float, nargs="+", default=[0.05, 20.0], help="adaptive runs' initial bounds")
    p.add_argument("--quantile", type=float, default=0.5, help="target quantile gamma")
    p.add_argument("--eta", type=float, default=0.2, help="the bound's learning rate")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=64, help="expected batch size E")
    p.add_argument("--epochs", type=float, default=15)
    p.add_argument("--probe", type=int, default=256)
    p.add_argument("--probe-every", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quiet", action="store_true", help="no per-point progress on stderr")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.epochs, a.probe, a.probe_every, a.fixed = 1, 0.5, 32, 2, [1.0]
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stem = "adaptive_clipping_quick" if args.quick else "adaptive_clipping"
    with quiet_single_thread():
        res: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
        res["digits"] = experiment(args)
    return publish(args.out, stem, res, markdown(res), plot)


if __name__ == "__main__":
    sys.exit(main())
