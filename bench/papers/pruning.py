"""Clipping, noise and pruning in DP-SGD (Watson et al. 2023, "Inference and Interference: The Role of
Clipping, Pruning and Loss Landscapes in Differentially Private Stochastic Gradient Descent").

    python -m bench.papers.pruning            # both experiments, a few minutes on a CPU core
    python -m bench.papers.pruning --quick    # a smoke run (CI), seconds

The claims tested: (1) taking DP-SGD apart, noise alone is an error plain SGD recovers from, clipping
costs more, and the two together cost most; DP-SGD falls behind early, but the late epochs decide the end
result (a run private early then not reaches SGD's accuracy, a run private late ends where DP-SGD does);
(2) magnitude pruning (fewer coordinates, so less noise in total) can raise DP-SGD's test accuracy, even
at high sparsity.

Set-up. scikit-learn's digits (1797 8x8 images, 10 classes), split 75/25 with a fixed seed, pixels
mapped by the fixed x / 8 - 1; an MLP 64-512-10 (ReLU), wide so that the dimension matters; SGD with
momentum 0.9 on Poisson batches (expected 128), loss_reduction="mean" (sum of losses / expected batch);
every variant trained through dpkernels.make_private:

- DP-SGD: clipping bound R, noise multiplier sigma calibrated by the accountant to the target epsilon
  at delta = 1e-5 over the run's steps;
- clip only: R, sigma = 0;  noise only: no clipping (R_big = 1e6, far above every per-sample norm) and
  the noise std of DP-SGD (noise multiplier sigma R / R_big);  neither: R_big, no noise (plain SGD);
- switches at half-way (make_private again on the model, continuing its optimizer): DP-SGD -> SGD and
  SGD -> DP-SGD. Not private (half of the run uses the data without noise): diagnostics only.

Experiment 2, at the same epsilon: masks from the model's *initial* weights (public: drawn before any
data is seen; dpkernels.pruning.magnitude_masks, per layer), pruned coordinates zeroed and kept at zero by
the engine (no gradient, no noise), for single weights (unstructured) and whole hidden units (rows:
the ghost norm by slicing), against sparsity; and the dense DP-SGD model pruned *after* training
(post-processing of the released weights, no retraining) at the same sparsities.
Each point: --seeds runs (initial weights, batches and noise seeded by the run's seed); mean ± std.
"""

from __future__ import annotations

import argparse
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
from torch.utils.data import TensorDataset

import dpkernels
from dpkernels.data import poisson_loader
from dpkernels.pruning import apply_masks, magnitude_masks

from ._common import DELTA, RESULTS, fmt, publish, pyplot, quiet_single_thread, spent_epsilon, spread

SPLIT_SEED = 0
R_BIG = 1e6  # "no clipping": far above any per-sample gradient norm of this model (O(1..10))
VARIANTS = ("neither", "noise only", "clip only", "DP-SGD", "DP-SGD -> SGD", "SGD -> DP-SGD")
PHASES = {  # (first half, second half): (clip, noise)
    "neither": ((False, False), (False, False)),
    "noise only": ((False, True), (False, True)),
    "clip only": ((True, False), (True, False)),
    "DP-SGD": ((True, True), (True, True)),
    "DP-SGD -> SGD": ((True, True), (False, False)),
    "SGD -> DP-SGD": ((False, False), (True, True)),
}


def load() -> tuple[TensorDataset, Tensor, Tensor]:
    """(train set, test inputs, test labels) of digits, split 75/25 (stratified, fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x / 8.0 - 1.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SPLIT_SEED, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    g = lambda a: torch.tensor(a, dtype=torch.long)
    return TensorDataset(f(x_tr), g(y_tr)), f(x_te), g(y_te)


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def masks_for(model: nn.Module, sparsity: float, structured: bool | str) -> dict[str, Tensor]:
    """Unstructured: the smallest |w| of each layer. Rows: the hidden units with the smallest weight rows
    (never the output layer's rows, which are the classes), each with its bias and its column of the
    output layer (a pruned unit outputs 0, so that column only collects noise)."""
    if not structured:
        return magnitude_masks(model, sparsity)
    masks = magnitude_masks(model, sparsity, structured="rows", include=["0"])
    unit = masks["0.bias"]
    masks["2.weight"] = unit[None, :].expand(10, unit.numel()).clone()
    return masks


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train_loss(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(data.tensors[0]), data.tensors[1]).item()
    model.train()
    return loss


def _private(
    model, opt, *, clip: bool, noise: bool, R: float, sigma: float, q: float, n: int, seed: int, account: bool
):
    """make_private for one phase; ``account``: a sampling rate for the accountant (DP-SGD runs only)."""
    bound = R if clip else R_BIG
    nm = (sigma * R / bound) if noise else 0.0  # the noise std sigma_eff * bound is sigma R in every noisy phase
    return dpkernels.make_private(
        model,
        getattr(opt, "original_optimizer", opt),
        noise_multiplier=nm,
        max_grad_norm=bound,
        expected_batch_size=q * n,
        sample_rate=q if account else None,
        seed=seed,
    )


def run(
    data: tuple[TensorDataset, Tensor, Tensor],
    args: argparse.Namespace,
    *,
    variant: str,
    sigma: float,
    seed: int,
    sparsity: float = 0.0,
    structured: bool | str = False,
    post_sparsities: Sequence[float] = (),
) -> dict[str, Any]:
    """One training run; test accuracy (and train loss) after every epoch."""
    train_set, x_te, y_te = data
    n = len(train_set)
    q = args.batch / n
    steps_per_epoch = math.ceil(1 / q)
    torch.manual_seed(seed)
    model = mlp(args.hidden)
    if sparsity > 0:  # masks from the initial weights: public, chosen before any data is seen
        apply_masks(model, masks_for(model, sparsity, structured))
    opt: Any = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    first, second = PHASES[variant]
    account = variant == "DP-SGD"
    model, opt = _private(
        model, opt, clip=first[0], noise=first[1], R=args.R, sigma=sigma, q=q, n=n, seed=seed, account=account
    )
    gen = torch.Generator().manual_seed(seed)
    acc, loss = [], []
    half = args.epochs // 2
    for epoch in range(args.epochs):
        if epoch == half and second != first:
            model, opt = _private(
                model, opt, clip=second[0], noise=second[1], R=args.R, sigma=sigma, q=q, n=n, seed=seed, account=False
            )
        for xb, yb in poisson_loader(train_set, q, steps=steps_per_epoch, generator=gen):
            opt.backward(F.cross_entropy(model(xb), yb))  # an empty batch's nan mean loss has no per-sample terms
            opt.step()
            opt.zero_grad(set_to_none=True)
        acc.append(accuracy(model, x_te, y_te))
        loss.append(train_loss(model, train_set))
    out: dict[str, Any] = {"accuracy": acc, "train_loss": loss, "steps": steps_per_epoch * args.epochs}
    if account:
        out["epsilon"] = spent_epsilon(opt.accountant)
    if post_sparsities:  # the released DP weights pruned afterwards: post-processing, no retraining
        post = {}
        for s in post_sparsities:
            m = mlp(args.hidden)
            m.load_state_dict(model.state_dict())
            if s > 0:
                apply_masks(m, masks_for(m, s, False))
            post[str(s)] = accuracy(m, x_te, y_te)
        out["post_pruned"] = post
    return out


def experiments(args: argparse.Namespace) -> dict[str, Any]:
    data = load()
    n = len(data[0])
    q = args.batch / n
    steps = math.ceil(1 / q) * args.epochs
    sigma = dpkernels.get_noise_multiplier(args.epsilon, DELTA, q, steps)
    res: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "n_train": n,
        "n_test": len(data[1]),
        "sample_rate": q,
        "steps": steps,
        "noise_multiplier": sigma,
        "ablation": {},
        "sparsity": {},
    }
    t0 = time.perf_counter()
    todo = [("ablation", v, 0.0, False) for v in VARIANTS]
    todo += [("sparsity", "DP-SGD", s, st) for st in args.structures for s in args.sparsities if s > 0]
    total = len(todo) * args.seeds
    done = 0
    for part, variant, s, st in todo:
        runs = []
        for seed in range(args.seeds):
            post = args.sparsities if (part == "ablation" and variant == "DP-SGD") else ()
            runs.append(
                run(
                    data, args, variant=variant, sigma=sigma, seed=seed, sparsity=s, structured=st, post_sparsities=post
                )
            )
            done += 1
            if not args.quiet:
                el = time.perf_counter() - t0
                print(f"  [{done}/{total}] {part:8} {variant:14} sparsity={s:<5g} {str(st):5} seed {seed}: "
                      f"acc {runs[-1]['accuracy'][-1]:.3f}  ({el:.0f} s, ~{el / done * (total - done):.0f} s left)",
                      file=sys.stderr)  # fmt: skip
        if part == "ablation":
            res["ablation"][variant] = {"runs": runs}
        else:
            res["sparsity"].setdefault(str(st), {})[str(s)] = {"runs": runs}
    res["seconds"] = time.perf_counter() - t0
    return res


def summarise(res: dict[str, Any]) -> None:
    cfg = res["config"]
    E = cfg["epochs"]
    early = max(1, E // 4) - 1  # the epoch index reported as "early": a quarter of the way
    for rec in res["ablation"].values():
        accs = np.array([r["accuracy"] for r in rec["runs"]])
        rec["curve"] = {
            "mean": accs.mean(0).tolist(),
            "std": accs.std(0, ddof=1).tolist() if len(accs) > 1 else [0.0] * E,
        }
        rec["early"] = spread(accs[:, early])
        rec["half"] = spread(accs[:, E // 2 - 1])
        rec["final"] = spread(accs[:, -1])
        losses = np.array([r["train_loss"] for r in rec["runs"]])
        rec["final_train_loss"] = spread(losses[:, -1])
    res["early_epoch"] = early + 1
    dense = res["ablation"]["DP-SGD"]
    res["epsilon_spent"] = [r["epsilon"] for r in dense["runs"]]
    curves: dict[str, Any] = {}
    for st in cfg["structures"]:
        pts = [{"sparsity": 0.0, "accuracy": dense["final"]}]
        for s, rec in sorted(res["sparsity"].get(str(st), {}).items(), key=lambda kv: float(kv[0])):
            rec["final"] = spread([r["accuracy"][-1] for r in rec["runs"]])
            eps = [r["epsilon"] for r in rec["runs"]]
            res["epsilon_spent"] += eps
            pts.append({"sparsity": float(s), "accuracy": rec["final"]})
        curves[str(st)] = pts
    curves["post-processing"] = [
        {"sparsity": float(s), "accuracy": spread([r["post_pruned"][str(s)] for r in dense["runs"]])}
        for s in cfg["sparsities"]
    ]
    res["sparsity_curves"] = curves


def markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    eps = res["epsilon_spent"]
    lines = [
        "# Clipping, noise and pruning in DP-SGD (Watson et al. 2023)",
        "",
        f"Command: `python -m bench.papers.pruning{' --quick' if cfg['quick'] else ''}`. digits, {res['n_train']} "
        f"train / {res['n_test']} test; MLP 64-{cfg['hidden']}-10; SGD lr {cfg['lr']:g} momentum 0.9; expected "
        f"batch {cfg['batch']} (q = {res['sample_rate']:.4f}), {cfg['epochs']} epochs = {res['steps']} steps; "
        f"R = {cfg['R']:g}; noise multiplier {res['noise_multiplier']:.3f} for epsilon {cfg['epsilon']:g} at delta "
        f"{DELTA:g} (accountant: {min(eps):.3f}..{max(eps):.3f} over every DP-SGD run). Test accuracy, mean ± "
        f"sample std over seeds 0..{cfg['seeds'] - 1} (n runs per cell). {res['seconds']:.0f} s.",
        "",
        "## Ablation: clipping, noise, both, neither; early against late epochs",
        "",
        f"| variant | epoch {res['early_epoch']} | epoch {cfg['epochs'] // 2} | epoch {cfg['epochs']} (final) "
        "| final train loss |",
        "|---|---|---|---|---|",
    ]
    for v, rec in res["ablation"].items():
        lines.append(
            f"| {v} | {fmt(rec['early'])} | {fmt(rec['half'])} | {fmt(rec['final'])} | "
            f"{rec['final_train_loss']['mean']:.3f} ± {rec['final_train_loss']['std']:.3f} |"
        )
    lines += [
        "",
        "Switched runs (DP-SGD -> SGD, SGD -> DP-SGD) change at half-way and are not private.",
        "",
        f"## Test accuracy against sparsity at epsilon {cfg['epsilon']:g}",
        "",
        "Masks from the initial weights (unstructured: single weights; rows: hidden units, with their bias), "
        "trained with DP-SGD; post-processing: the dense DP-SGD model pruned after training.",
        "",
        "| sparsity | " + " | ".join(res["sparsity_curves"]) + " |",
        "|---" * (len(res["sparsity_curves"]) + 1) + "|",
    ]
    by = {k: {p["sparsity"]: p["accuracy"] for p in pts} for k, pts in res["sparsity_curves"].items()}
    for s in cfg["sparsities"]:
        lines.append(f"| {s:g} | " + " | ".join(fmt(by[k][float(s)]) if float(s) in by[k] else "-" for k in by) + " |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    cfg = res["config"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    epochs = np.arange(1, cfg["epochs"] + 1)
    styles = {"DP-SGD -> SGD": ":", "SGD -> DP-SGD": ":"}
    for i, (v, rec) in enumerate(res["ablation"].items()):
        m, s = np.array(rec["curve"]["mean"]), np.array(rec["curve"]["std"])
        ax.plot(epochs, m, styles.get(v, "-"), color=f"C{i}", label=v, lw=1.6)
        ax.fill_between(epochs, m - s, m + s, color=f"C{i}", alpha=0.12)
    ax.axvline(cfg["epochs"] // 2 + 0.5, color="gray", lw=0.8, ls="--")
    ax.set(xlabel="epoch", ylabel="test accuracy", title=f"digits: ablation ({cfg['seeds']} seeds, ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    for i, (k, pts) in enumerate(res["sparsity_curves"].items()):
        xs = np.array([p["sparsity"] for p in pts])
        m = np.array([p["accuracy"]["mean"] for p in pts])
        s = np.array([p["accuracy"]["std"] for p in pts])
        label = {"False": "masks at init, unstructured", "rows": "masks at init, rows"}.get(k, k)
        ax.errorbar(xs, m, yerr=s, fmt="o-", color=f"C{i}", label=label, capsize=3)
    eps = max(res["epsilon_spent"])
    ax.set(xlabel="sparsity (weights pruned; rows: hidden units pruned)", ylabel="test accuracy")
    ax.set_title(f"DP-SGD at epsilon {eps:.2f} (delta {DELTA:g}), {cfg['seeds']} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.papers.pruning", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="2 epochs of batch 256, 2 sparsities, hidden 32, 2 seeds: a smoke run"
    )
    p.add_argument("--epsilon", type=float, default=2.0, help=f"target epsilon at delta={DELTA:g}")
    p.add_argument("--seeds", type=int, default=3, help="runs per point (seeds 0..k-1)")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch", type=int, default=128, help="expected Poisson batch")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--R", type=float, default=1.0, help="clipping bound")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9, 0.95])
    p.add_argument("--structures", nargs="+", default=["False", "rows"], choices=["False", "rows"])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quiet", action="store_true", help="no per-run progress on stderr")
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.sparsities, a.hidden, a.seeds, a.batch = 2, [0.0, 0.9], 32, 2, 256
    a.structures = [False if s == "False" else s for s in a.structures]
    if a.seeds < 1 or a.epochs < 2:
        p.error("--seeds must be >= 1 and --epochs >= 2")
    if 0.0 not in a.sparsities:
        a.sparsities = [0.0, *a.sparsities]
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stem = "pruning_quick" if args.quick else "pruning"
    with quiet_single_thread():
        res = experiments(args)
    summarise(res)
    return publish(args.out, stem, res, markdown(res), plot)


if __name__ == "__main__":
    sys.exit(main())
