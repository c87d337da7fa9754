"""Automatic clipping (AUTO-S, Bu et al. 2022) against Abadi clipping over a sweep of R, at the same epsilon.

    python -m bench.papers.automatic_clipping            # the full sweep, minutes on a CPU core
    python -m bench.papers.automatic_clipping --quick    # a smoke run (CI), seconds

The claim: AUTO-S, c_i = R / (||g_i|| + gamma), has no clipping bound to tune, and reaches the
accuracy of Abadi clipping, c_i = min(1, R / ||g_i||), at Abadi's best R.

Set-up. Two tables that scikit-learn ships: digits (1797 8x8 images, 10 classes) and breast-cancer
(569 samples, 30 features, 2 classes), each split 75/25 with a fixed seed; an MLP with one hidden
layer; DP-SGD with momentum 0.9 on Poisson batches, noise calibrated by the accountant to the same
epsilon at delta = 1e-5 for every run of a data set (the noise does not depend on the clip function
or on R: sigma multiplies R_total).

Learning-rate rule: lr = lr0 / R for both clip functions. The update is then
lr0 * (sum_i (c_i / R) g_i + N(0, sigma^2)) / B: the noise term no longer depends on R, and

- AUTO-S becomes lr0 * sum_i g_i / (||g_i|| + gamma): R cancels, so AUTO-S is one run per lr0
  (normalised SGD with a stability constant gamma; Bu et al.'s equivalence), run here at R = 1;
- Abadi tends, as R -> 0 (every sample clipped), to the same normalised update with gamma = 0
  (AUTO-V), and, as R grows past the per-sample norms (nothing clipped), to plain SGD with step
  lr0 / R whose signal shrinks against the fixed noise.

Abadi is swept over R in 0.01..10 (log-spaced) for each lr0 of a small grid, AUTO-S over the same
lr0 grid; each point is `--seeds` runs (initial weights, batches and noise seeded by the run's seed).
The inputs are mapped by fixed functions (no statistic of the training set, which the accounting
would not cover): digits' pixels 0..16 to [-1, 1]; breast-cancer's positive features by log(x + 1e-3) / 4.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import dpkernels
from dpkernels.data import poisson_loader

from ._common import DELTA, RESULTS, fmt, publish, pyplot, quiet_single_thread, spent_epsilon, spread

SPLIT_SEED = 0
GAMMA = 0.01  # AUTO-S's stability constant (make_private's default, Bu et al.'s value)


@dataclass(frozen=True)
class Task:
    """One data set and how it is trained: expected Poisson batch, epochs, MLP width."""

    name: str
    batch: int
    epochs: float
    hidden: int


TASKS = {
    "digits": Task("digits", batch=128, epochs=15, hidden=64),
    "breast-cancer": Task("breast-cancer", batch=64, epochs=30, hidden=32),
}


def load(name: str) -> tuple[TensorDataset, Tensor, Tensor]:
    """(train set, test inputs, test labels), split 75/25 (stratified, fixed seed); inputs by a fixed map."""
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    if name == "digits":
        x, y = load_digits(return_X_y=True)
        x = x / 8.0 - 1.0
    elif name == "breast-cancer":
        x, y = load_breast_cancer(return_X_y=True)
        x = np.log(x + 1e-3) / 4.0  # features are >= 0 and span 1e-3..4e3
    else:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(TASKS)}")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SPLIT_SEED, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    g = lambda a: torch.tensor(a, dtype=torch.long)
    return TensorDataset(f(x_tr), g(y_tr)), f(x_te), g(y_te)


def mlp(d_in: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def train_once(
    data: tuple[TensorDataset, Tensor, Tensor],
    task: Task,
    *,
    clipping: str,
    R: float,
    lr0: float,
    sigma: float,
    seed: int,
) -> dict[str, Any]:
    """One DP-SGD run; returns its test accuracy, the accountant's epsilon and its number of steps."""
    train_set, x_te, y_te = data
    n = len(train_set)
    q = task.batch / n
    steps = math.ceil(task.epochs / q)
    classes = int(train_set.tensors[1].max()) + 1
    torch.manual_seed(seed)
    model = mlp(train_set.tensors[0].shape[1], task.hidden, classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr0 / R, momentum=0.9)
    model, opt = dpkernels.make_private(
        model,
        opt,
        noise_multiplier=sigma,
        max_grad_norm=R,
        clipping=clipping,
        gamma=GAMMA,
        sample_rate=q,
        dataset_size=n,
        seed=seed,
    )
    loader = poisson_loader(train_set, q, steps=steps, generator=torch.Generator().manual_seed(seed))
    for xb, yb in loader:
        opt.backward(F.cross_entropy(model(xb), yb))  # an empty batch's nan mean loss has zero per-sample terms
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        logits = model(x_te)
    acc = (logits.argmax(1) == y_te).float().mean().item()
    return {"accuracy": acc, "epsilon": spent_epsilon(opt.accountant), "steps": steps}


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Every (data set, clip function, lr0, R, seed) run; sigma calibrated once per data set."""
    rs = [float(r) for r in np.logspace(math.log10(args.r_min), math.log10(args.r_max), args.n_r)]
    out: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "R": rs, "tasks": {}}
    for name in args.datasets:
        task = TASKS[name]
        if args.quick:
            task = Task(task.name, task.batch, epochs=min(task.epochs, 2), hidden=task.hidden)
        data = load(name)
        n = len(data[0])
        q = task.batch / n
        steps = math.ceil(task.epochs / q)
        sigma = dpkernels.get_noise_multiplier(args.epsilon, DELTA, q, steps)
        rec: dict[str, Any] = {
            "task": asdict(task),
            "n_train": n,
            "n_test": len(data[1]),
            "sample_rate": q,
            "steps": steps,
            "noise_multiplier": sigma,
            "runs": [],
        }
        t0 = time.perf_counter()
        points = [("automatic", 1.0, lr0) for lr0 in args.lr0] + [("abadi", r, lr0) for lr0 in args.lr0 for r in rs]
        for clipping, R, lr0 in points:
            for seed in range(args.seeds):
                r = train_once(data, task, clipping=clipping, R=R, lr0=lr0, sigma=sigma, seed=seed)
                rec["runs"].append({"clipping": clipping, "R": R, "lr0": lr0, "seed": seed, **r})
            if not args.quiet:
                accs = [x["accuracy"] for x in rec["runs"][-args.seeds :]]
                print(f"  {name:14} {clipping:9} R={R:<8.3g} lr0={lr0:<5g} acc {fmt(spread(accs))}", file=sys.stderr)
        rec["seconds"] = time.perf_counter() - t0
        out["tasks"][name] = rec
    return out


def summarise(res: dict[str, Any]) -> None:
    """Add per-point spreads, each clip function's best point, and the epsilon range, to ``res``."""
    for rec in res["tasks"].values():
        points: dict[tuple[str, float, float], list[float]] = {}
        for r in rec["runs"]:
            points.setdefault((r["clipping"], r["R"], r["lr0"]), []).append(r["accuracy"])
        rec["points"] = [
            {"clipping": c, "R": R, "lr0": lr0, "accuracy": spread(a)} for (c, R, lr0), a in points.items()
        ]
        for c in ("abadi", "automatic"):
            rec[f"best_{c}"] = max(
                (p for p in rec["points"] if p["clipping"] == c), key=lambda p: p["accuracy"]["mean"]
            )
        eps = [r["epsilon"] for r in rec["runs"]]
        rec["epsilon_spent"] = {"min": min(eps), "max": max(eps)}


def markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = [
        "# Automatic clipping (AUTO-S) against Abadi clipping over R",
        "",
        f"Command: `python -m bench.papers.automatic_clipping{' --quick' if cfg['quick'] else ''}`. "
        f"Target epsilon {cfg['epsilon']:g} at delta {DELTA:g}; lr = lr0 / R for both clip functions "
        f"(AUTO-S is R-free under this rule and runs at R = 1); gamma = {GAMMA:g}; SGD momentum 0.9. "
        f"Test accuracy, mean ± sample std over seeds 0..{cfg['seeds'] - 1} (n runs per point).",
    ]
    for name, rec in res["tasks"].items():
        t = rec["task"]
        e = rec["epsilon_spent"]
        lines += [
            "",
            f"## {name}",
            "",
            f"{rec['n_train']} train / {rec['n_test']} test; MLP hidden {t['hidden']}; expected batch {t['batch']} "
            f"(q = {rec['sample_rate']:.4f}), {rec['steps']} steps ({t['epochs']:g} epochs); noise multiplier "
            f"{rec['noise_multiplier']:.3f}; epsilon spent (accountant, every run): {e['min']:.3f}..{e['max']:.3f}; "
            f"{rec['seconds']:.0f} s.",
            "",
            "| lr0 | AUTO-S | " + " | ".join(f"Abadi R={r:.3g}" for r in res["R"]) + " |",
            "|---" * (len(res["R"]) + 2) + "|",
        ]
        by = {(p["clipping"], p["R"], p["lr0"]): p["accuracy"] for p in rec["points"]}
        for lr0 in cfg["lr0"]:
            cells = [fmt(by[("automatic", 1.0, lr0)])] + [fmt(by[("abadi", r, lr0)]) for r in res["R"]]
            lines.append(f"| {lr0:g} | " + " | ".join(cells) + " |")
        ba, bs = rec["best_abadi"], rec["best_automatic"]
        lines += [
            "",
            f"Best Abadi: R = {ba['R']:.3g}, lr0 = {ba['lr0']:g}: {fmt(ba['accuracy'])}. "
            f"Best AUTO-S: lr0 = {bs['lr0']:g}: {fmt(bs['accuracy'])}.",
        ]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Accuracy against R per data set: Abadi (one line per lr0, band = ± std), AUTO-S dashed at the same colour."""
    plt = pyplot()
    names = list(res["tasks"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rec = res["tasks"][name]
        by = {(p["clipping"], p["R"], p["lr0"]): p["accuracy"] for p in rec["points"]}
        for i, lr0 in enumerate(res["config"]["lr0"]):
            color = f"C{i}"
            m = np.array([by[("abadi", r, lr0)]["mean"] for r in res["R"]])
            s = np.array([by[("abadi", r, lr0)]["std"] for r in res["R"]])
            ax.plot(res["R"], m, "o-", color=color, label=f"Abadi, lr0={lr0:g}")
            ax.fill_between(res["R"], m - s, m + s, color=color, alpha=0.15)
            a = by[("automatic", 1.0, lr0)]
            ax.axhline(a["mean"], color=color, ls="--", label=f"AUTO-S, lr0={lr0:g}")
            ax.axhspan(a["mean"] - a["std"], a["mean"] + a["std"], color=color, alpha=0.08)
        e = rec["epsilon_spent"]["max"]
        n_seeds = res["config"]["seeds"]
        ax.set(xscale="log", xlabel="clipping bound R (lr = lr0 / R)", ylabel="test accuracy")
        ax.set_title(f"{name}: epsilon {e:.2f} (delta {DELTA:g}), {n_seeds} seeds per point", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.papers.automatic_clipping", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 data sets x 2 R x 1 lr0 x 3 seeds, 2 epochs: a smoke run")
    p.add_argument("--datasets", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    p.add_argument("--epsilon", type=float, default=3.0, help=f"target epsilon at delta={DELTA:g}")
    p.add_argument("--seeds", type=int, default=3, help="runs per point (seeds 0..k-1)")
    p.add_argument("--lr0", type=float, nargs="+", default=[0.03, 0.1, 0.3], help="lr = lr0 / R")
    p.add_argument("--r-min", type=float, default=0.01)
    p.add_argument("--r-max", type=float, default=10.0)
    p.add_argument("--n-r", type=int, default=7, help="log-spaced values of R from r-min to r-max")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quiet", action="store_true", help="no per-point progress on stderr")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.lr0, a.n_r, a.r_min, a.r_max = 3, [0.1], 2, 0.01, 10.0
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stem = "automatic_clipping_quick" if args.quick else "automatic_clipping"
    with quiet_single_thread():
        res = sweep(args)
    summarise(res)
    return publish(args.out, stem, res, markdown(res), plot)


if __name__ == "__main__":
    sys.exit(main())
