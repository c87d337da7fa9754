"""Clipping bias and its correction by pre-clipping perturbation (Chen, Wu & Hong 2020).

    python -m bench.papers.perturbed_clipping            # the full run, minutes on a CPU core
    python -m bench.papers.perturbed_clipping --quick    # a smoke run (CI), seconds

The claims: (1) clipping per-sample gradients biases DP-SGD when their distribution is not
symmetric: it converges to a point where the *clipped* gradients cancel, not the optimum; (2)
clipping g_i + k zeta_i, zeta_i ~ N(0, I) (make_private(..., perturb_k=k)), makes the distribution
closer to symmetric and removes most of that bias, at the cost of extra variance; (3) along real
training runs the per-sample gradient distributions are close to symmetric, which is why plain
clipping works in practice.

(a) Mean estimation in 2-D through make_private: the model is one point w (an nn.Linear(1, 2) without
bias, fed the input 1), the per-sample loss 0.5 ||w - a_i||^2, so g_i = w - a_i and the optimum is the
mean of the a_i. Three quarters of the points sit near (-1, 0), one quarter near (3, 1): at the mean
the far cluster's gradients are clipped to R = 1 and the near cluster's are not, so plain clipping
settles where sum_i clip(w - a_i) = 0, about 0.67 from the mean. DP-SGD (Poisson rate 0.1, epsilon
from the accountant) for k in {0, 1, 2, 4}; the distance of the averaged last iterates to the mean.

(b) Digits (scikit-learn's 8x8 images, 75/25 split), an MLP 64-32-10, DP-SGD with momentum at
epsilon 3: every `--probe-every` steps the per-sample gradients g_i of a fixed probe set of 256
training images are taken (torch.func on a plain copy of the model: a measurement of the run, not
part of it), with g = mean g_i and xi_i = g_i - g. The paper bounds the clipping bias by how far the
distribution p of xi is from a symmetric one p~; we take p~ = (p(xi) + p(-xi)) / 2, its symmetrisation,
and report its bias term

    b = E_p~ <g, clip(g + xi)> - E_p <g, clip(g + xi)> = (E <g, clip(g - xi_i)> - E <g, clip(g + xi_i)>) / 2,

relative to E_p~ <g, clip(g + xi)> (0 for a symmetric p; > 0 when clipping loses progress along g),
for plain clipping (xi_i) and for the perturbed vectors (xi_i + k zeta_i); and the mean |skewness| of
<xi_i, u> over 32 random unit directions u (0 for a symmetric distribution). Runs with plain clipping
and with perturb_k = k give the test accuracy at the same epsilon.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

import dpkernels
from dpkernels.data import poisson_loader

from ._common import DELTA, RESULTS, fmt, publish, pyplot, quiet_single_thread, spent_epsilon, spread

DATA_SEED = 0
R_MEAN = 1.0  # (a)'s clipping bound


# ----------------------------------------------------------------------------- (a) mean estimation


def mean_data(n: int) -> Tensor:
    """n points in 2-D: 3/4 near (-1, 0), 1/4 near (3, 1) (std 0.1), from a fixed generator."""
    g = torch.Generator().manual_seed(DATA_SEED)
    far = torch.arange(n) % 4 == 3
    centre = torch.where(far[:, None], torch.tensor([3.0, 1.0]), torch.tensor([-1.0, 0.0]))
    return centre + 0.1 * torch.randn(n, 2, generator=g)


def clipped_fixed_point(a: Tensor, R: float, iters: int = 5000) -> Tensor:
    """The point where the full-batch clipped gradients cancel: sum_i clip(w - a_i) = 0 (noiseless)."""
    w = a.mean(0).clone().double()
    a = a.double()
    for _ in range(iters):
        g = w - a
        c = (R / g.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        w = w - 0.5 * (c[:, None] * g).mean(0)
    return w.float()


def run_mean(a: Tensor, *, k: float, sigma: float, q: float, steps: int, lr: float, seed: int) -> dict[str, Any]:
    """DP-SGD on 0.5 ||w - a_i||^2 with perturb_k = k; the trajectory of w and the final averaged iterate."""
    torch.manual_seed(seed)
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.5], [-1.5]]))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = len(a)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=sigma, max_grad_norm=R_MEAN, sample_rate=q, dataset_size=n, seed=seed,
        perturb_k=k,
    )  # fmt: skip
    data = TensorDataset(torch.ones(n, 1), a)
    loader = poisson_loader(data, q, steps=steps, generator=torch.Generator().manual_seed(seed))
    path = [model.weight.detach().flatten().clone()]
    for xb, ab in loader:
        opt.backward(0.5 * (model(xb) - ab).square().sum(1))  # per-sample losses
        opt.step()
        opt.zero_grad(set_to_none=True)
        path.append(model.weight.detach().flatten().clone())
    traj = torch.stack(path)
    tail = traj[-max(1, steps // 5) :].mean(0)  # averaged last fifth: the DP noise averages out
    return {"final": tail.tolist(), "trajectory": traj, "epsilon": spent_epsilon(opt.accountant)}


def experiment_mean(args: argparse.Namespace) -> dict[str, Any]:
    a = mean_data(args.mean_n)
    q, steps = args.mean_q, args.mean_steps
    sigma = dpkernels.get_noise_multiplier(args.epsilon, DELTA, q, steps)
    mean = a.mean(0)
    fixed = clipped_fixed_point(a, R_MEAN)
    rec: dict[str, Any] = {
        "n": len(a),
        "sample_rate": q,
        "steps": steps,
        "lr": args.mean_lr,
        "noise_multiplier": sigma,
        "mean": mean.tolist(),
        "plain_fixed_point": fixed.tolist(),
        "plain_fixed_point_distance": float((fixed - mean).norm()),
        "runs": [],
        "curves": {},
    }
    t0 = time.perf_counter()
    for k in args.mean_k:
        dists = []
        for seed in range(args.seeds):
            r = run_mean(a, k=k, sigma=sigma, q=q, steps=steps, lr=args.mean_lr, seed=seed)
            d = float((torch.tensor(r["final"]) - mean).norm())
            rec["runs"].append({"k": k, "seed": seed, "final": r["final"], "distance": d, "epsilon": r["epsilon"]})
            dists.append((r["trajectory"] - mean).norm(dim=1))
            if seed == 0:
                rec["curves"][str(k)] = r["trajectory"].tolist()
        rec.setdefault("distance_curves", {})[str(k)] = torch.stack(dists).mean(0).tolist()
        if not args.quiet:
            print(f"  mean estimation k={k:<5g} distance {fmt(spread(_dist(rec, k)), 1, 3)}", file=sys.stderr)
    rec["points"] = [{"k": k, "distance": spread(_dist(rec, k))} for k in args.mean_k]
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _dist(rec: dict[str, Any], k: float) -> list[float]:
    return [r["distance"] for r in rec["runs"] if r["k"] == k]


# ----------------------------------------------------------------------------- (b) digits


def load_digits() -> tuple[TensorDataset, Tensor, Tensor]:
    from sklearn.datasets import load_digits as ld
    from sklearn.model_selection import train_test_split

    x, y = ld(return_X_y=True)
    x = x / 8.0 - 1.0  # a fixed map of the pixels 0..16 to [-1, 1] (no statistic of the training set)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=DATA_SEED, stratify=y)
    f = lambda v: torch.tensor(v, dtype=torch.float32)
    g = lambda v: torch.tensor(v, dtype=torch.long)
    return TensorDataset(f(x_tr), g(y_tr)), f(x_te), g(y_te)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def per_sample_grads(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(n, P) per-sample gradients of the cross-entropy, on a plain copy of the model (torch.func)."""
    plain = mlp()
    plain.load_state_dict(copy.deepcopy(model.state_dict()))
    params = {n: p.detach() for n, p in plain.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(plain, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].flatten(1) for n in params], 1).double()


def _clip(v: Tensor, R: float) -> Tensor:
    return v * (R / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)


def symmetry(gs: Tensor, R: float, k: float, gen: torch.Generator, n_dirs: int = 32) -> dict[str, float]:
    """The symmetrisation bias term (relative) for plain and perturbed clipping, and random-projection skewness."""
    gbar = gs.mean(0)
    xi = gs - gbar

    def rel_bias(noise: Tensor) -> float:
        plus = (_clip(gbar + noise, R) @ gbar).mean()
        minus = (_clip(gbar - noise, R) @ gbar).mean()
        sym = 0.5 * (plus + minus)
        return float(0.5 * (minus - plus) / sym) if float(sym) != 0.0 else 0.0

    z = torch.randn(gs.shape, generator=gen, dtype=gs.dtype)
    u = torch.randn(n_dirs, gs.shape[1], generator=gen, dtype=gs.dtype)
    u = u / u.norm(dim=1, keepdim=True)
    proj = xi @ u.T
    skew = (proj - proj.mean(0)).pow(3).mean(0) / proj.std(0, correction=0).pow(3).clamp_min(1e-300)
    along = xi @ (gbar / gbar.norm().clamp_min(1e-300))
    skew_g = float((along - along.mean()).pow(3).mean() / along.std(correction=0).pow(3).clamp_min(1e-300))
    return {
        "bias_plain": rel_bias(xi),
        "bias_perturbed": rel_bias(xi + k * z),
        "skew_random": float(skew.abs().mean()),
        "skew_gradient_direction": skew_g,
        "grad_norm": float(gbar.norm()),
        "median_sample_norm": float(gs.norm(dim=1).median()),
    }


def run_digits(
    data: tuple[TensorDataset, Tensor, Tensor], args: argparse.Namespace, *, k: float, sigma: float, seed: int
) -> dict[str, Any]:
    train_set, x_te, y_te = data
    n = len(train_set)
    q = args.batch / n
    steps = math.ceil(args.epochs / q)
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=sigma, max_grad_norm=args.R, sample_rate=q, dataset_size=n, seed=seed,
        perturb_k=k,
    )  # fmt: skip
    probe = torch.Generator().manual_seed(DATA_SEED)
    idx = torch.randperm(n, generator=probe)[: args.probe]
    px, py = train_set.tensors[0][idx], train_set.tensors[1][idx]
    gen = torch.Generator().manual_seed(1000 + seed)
    trace = []
    loader = poisson_loader(train_set, q, steps=steps, generator=torch.Generator().manual_seed(seed))
    for step, (xb, yb) in enumerate(loader):
        if step % args.probe_every == 0:
            trace.append({"step": step, **symmetry(per_sample_grads(model, px, py), args.R, args.k, gen)})
        opt.backward(F.cross_entropy(model(xb), yb))
        opt.step()
        opt.zero_grad(set_to_none=True)
    trace.append({"step": steps, **symmetry(per_sample_grads(model, px, py), args.R, args.k, gen)})
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return {"accuracy": acc, "epsilon": spent_epsilon(opt.accountant), "steps": steps, "trace": trace}


def experiment_digits(args: argparse.Namespace) -> dict[str, Any]:
    data = load_digits()
    n = len(data[0])
    q = args.batch / n
    steps = math.ceil(args.epochs / q)
    sigma = dpkernels.get_noise_multiplier(args.epsilon, DELTA, q, steps)
    rec: dict[str, Any] = {
        "n_train": n,
        "n_test": len(data[1]),
        "sample_rate": q,
        "steps": steps,
        "noise_multiplier": sigma,
        "runs": [],
    }
    t0 = time.perf_counter()
    for k in (0.0, args.k):
        for seed in range(args.seeds):
            r = run_digits(data, args, k=k, sigma=sigma, seed=seed)
            rec["runs"].append({"k": k, "seed": seed, **r})
        if not args.quiet:
            accs = [r["accuracy"] for r in rec["runs"] if r["k"] == k]
            print(f"  digits k={k:<6g} accuracy {fmt(spread(accs))}", file=sys.stderr)
    rec["points"] = [
        {"k": k, "accuracy": spread([r["accuracy"] for r in rec["runs"] if r["k"] == k])} for k in (0.0, args.k)
    ]
    plain = [t for r in rec["runs"] if r["k"] == 0.0 for t in r["trace"]]
    rec["symmetry_plain_run"] = {
        key: spread([t[key] for t in plain])
        for key in ("bias_plain", "bias_perturbed", "skew_random", "skew_gradient_direction")
    }
    rec["seconds"] = time.perf_counter() - t0
    return rec


# ----------------------------------------------------------------------------- outputs


def markdown(res: dict[str, Any]) -> str:
    cfg, m, d = res["config"], res["mean"], res["digits"]
    eps_m = [r["epsilon"] for r in m["runs"]]
    eps_d = [r["epsilon"] for r in d["runs"]]
    lines = [
        "# Perturbed clipping (Chen, Wu & Hong 2020)",
        "",
        f"Command: `python -m bench.papers.perturbed_clipping{' --quick' if cfg['quick'] else ''}`. "
        f"Seeds 0..{cfg['seeds'] - 1}; mean ± sample std over seeds (n runs).",
        "",
        "## (a) 2-D mean estimation",
        "",
        f"{m['n']} points, R = {R_MEAN:g}, Poisson rate {m['sample_rate']:g}, {m['steps']} steps, lr {m['lr']:g}, "
        f"noise multiplier {m['noise_multiplier']:.3f}, epsilon spent {min(eps_m):.3f}..{max(eps_m):.3f} "
        f"(delta {DELTA:g}). Mean of the data {_pt(m['mean'])}; noiseless plain-clipping fixed point "
        f"{_pt(m['plain_fixed_point'])}, {m['plain_fixed_point_distance']:.3f} from the mean.",
        "",
        "| k | distance of the averaged last iterates to the mean |",
        "|---|---|",
    ]
    lines += [f"| {p['k']:g} | {fmt(p['distance'], 1, 3)} |" for p in m["points"]]
    s = d["symmetry_plain_run"]
    lines += [
        "",
        "## (b) digits: symmetry of per-sample gradients along DP training",
        "",
        f"{d['n_train']} train / {d['n_test']} test; MLP 64-32-10; R = {cfg['R']:g}, lr {cfg['lr']:g} (momentum "
        f"0.9), expected batch {cfg['batch']} (q = {d['sample_rate']:.4f}), {d['steps']} steps; noise multiplier "
        f"{d['noise_multiplier']:.3f}; epsilon spent {min(eps_d):.3f}..{max(eps_d):.3f}; probe set of "
        f"{cfg['probe']} training images every {cfg['probe_every']} steps; k = {cfg['k']:g}; {d['seconds']:.0f} s.",
        "",
        "| clipping | test accuracy |",
        "|---|---|",
    ]
    lines += [f"| {_name(p['k'])} | {fmt(p['accuracy'])} |" for p in d["points"]]
    lines += [
        "",
        "Over every probe of the plain-clipping runs:",
        "",
        "| measure | mean ± std over probes and seeds |",
        "|---|---|",
        f"| relative symmetrisation bias, plain clipping | {fmt(s['bias_plain'], 1, 4)} |",
        f"| relative symmetrisation bias, perturbed vectors (k = {cfg['k']:g}) | {fmt(s['bias_perturbed'], 1, 4)} |",
        f"| mean abs. skewness over 32 random directions | {fmt(s['skew_random'], 1, 2)} |",
        f"| skewness along the mean gradient | {fmt(s['skew_gradient_direction'], 1, 2)} |",
    ]
    return "\n".join(lines)


def _name(k: float) -> str:
    return "plain" if k == 0 else f"perturbed, k = {k:g}"


def _pt(p: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in p) + ")"


def plot(res: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    m, d = res["mean"], res["digits"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    ax = axes[0]
    a = mean_data(m["n"])
    ax.scatter(a[::5, 0], a[::5, 1], s=3, color="0.7", label="data (1 in 5)")
    for i, (k, traj) in enumerate(m["curves"].items()):
        t = np.array(traj)
        ax.plot(t[:, 0], t[:, 1], "-", lw=0.8, color=f"C{i}", label=f"k = {float(k):g} (seed 0)")
    ax.plot(*m["mean"], "k*", ms=12, label="mean (optimum)")
    ax.plot(*m["plain_fixed_point"], "rx", ms=10, mew=2, label="plain clipping's fixed point")
    ax.set(xlabel="w[0]", ylabel="w[1]", title="(a) DP-SGD trajectories, R = 1")
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, (k, curve) in enumerate(m["distance_curves"].items()):
        ax.plot(curve, color=f"C{i}", label=f"k = {float(k):g}")
    ax.axhline(m["plain_fixed_point_distance"], color="r", ls=":", label="plain fixed point")
    eps = max(r["epsilon"] for r in m["runs"])
    ax.set(xlabel="step", ylabel="||w - mean||", yscale="log")
    ax.set_title(f"(a) distance to the optimum, mean of {res['config']['seeds']} seeds, eps {eps:.2f}", fontsize=9)
    ax.legend(fontsize=7)
    for ax, keys, title in (
        (axes[2], ("bias_plain", "bias_perturbed"), "(b) relative symmetrisation bias"),
        (axes[3], ("skew_random", "skew_gradient_direction"), "(b) skewness of xi projections"),
    ):
        for j, key in enumerate(keys):
            for run in d["runs"]:
                if run["k"] != 0.0:
                    continue
                st = [t["step"] for t in run["trace"]]
                ax.plot(
                    st,
                    [t[key] for t in run["trace"]],
                    color=f"C{j}",
                    alpha=0.7,
                    label=key if run["seed"] == 0 else None,
                )
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set(xlabel="DP-SGD step (plain clipping runs, digits)", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.papers.perturbed_clipping", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps, 3 seeds: a smoke run")
    p.add_argument("--seeds", type=int, default=3, help="runs per point (seeds 0..k-1)")
    p.add_argument("--epsilon", type=float, default=3.0, help=f"target epsilon at delta={DELTA:g}")
    p.add_argument("--mean-n", type=int, default=1000)
    p.add_argument("--mean-q", type=float, default=0.1)
    p.add_argument("--mean-steps", type=int, default=400)
    p.add_argument("--mean-lr", type=float, default=0.5)
    p.add_argument("--mean-k", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    p.add_argument("--R", type=float, default=1.0, help="(b)'s clipping bound")
    p.add_argument("--lr", type=float, default=0.1, help="(b)'s learning rate")
    p.add_argument("--k", type=float, default=0.05, help="(b)'s perturbation (k sqrt(P) = 2.5: about a median ||g_i||)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--probe", type=int, default=256)
    p.add_argument("--probe-every", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quiet", action="store_true", help="no per-point progress on stderr")
    a = p.parse_args(argv)
    if a.quick:
        a.mean_n, a.mean_steps, a.mean_k, a.epochs, a.probe, a.probe_every = 400, 20, [0.0, 2.0], 0.5, 32, 3
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stem = "perturbed_clipping_quick" if args.quick else "perturbed_clipping"
    with quiet_single_thread():
        res: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
        res["mean"] = experiment_mean(args)
        res["digits"] = experiment_digits(args)
    return publish(args.out, stem, res, markdown(res), plot)


if __name__ == "__main__":
    sys.exit(main())
