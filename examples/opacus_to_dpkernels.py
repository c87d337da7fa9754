"""From Opacus to dpkernels: the same DP-SGD training three ways.

Data: scikit-learn's bundled digits (1,797 8x8 grey images, 10 classes; shipped with the package, no
download), 1,500 for training, the rest for testing. Model: a small CNN, Conv2d + GroupNorm + Linear
(GroupNorm, not BatchNorm: batch statistics mix samples, which DP-SGD cannot have).

    A. Opacus as usual: PrivacyEngine.make_private(..., grad_sample_mode="ghost").
    B. The same Opacus code after ONE line,

           dpkernels.opacus_backend.enable()

       which gives Opacus dpkernels' per-sample norms for Conv, GroupNorm, LayerNorm, RMSNorm,
       Embedding and Linear: convolutions and norm layers no longer instantiate per-sample gradients.
       Everything else is Opacus's (clipping, noise, accounting); with the same seeds, A and B reach
       the same parameters up to float32 rounding.
    C. dpkernels end to end: dpkernels.make_private(model, optimizer, ...) and a Poisson loader; the
       loop is a plain PyTorch loop (loss.backward(); optimizer.step()).

The three use the same noise multiplier, clipping bound, sampling rate and number of steps, so their
epsilons agree (Opacus's RDP accountant and dp-accounting's RDP, each at its own grid of orders).

    python examples/opacus_to_dpkernels.py            # 3 epochs each, well under a minute on a CPU
    python examples/opacus_to_dpkernels.py --quick    # a few steps each, for the tests
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from opacus import PrivacyEngine
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpkernels
import dpkernels.opacus_backend
from dpkernels.data import poisson_loader

N_TRAIN = 1500


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.GroupNorm(4, 32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def load() -> tuple[TensorDataset, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    return float((model(x).argmax(1) == y).float().mean())


def train_opacus(init, train, args, steps, use_dpkernels: bool) -> tuple[nn.Module, float, float]:
    """A and B: an Opacus loop; B differs by dpkernels.opacus_backend.enable() only."""
    model = copy.deepcopy(init)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = DataLoader(train, batch_size=args.batch, generator=torch.Generator().manual_seed(1))
    engine = PrivacyEngine(accountant="rdp")
    if use_dpkernels:
        dpkernels.opacus_backend.enable()  # <- the one-line switch
    try:
        dp_model, optimizer, criterion, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=args.sigma,
            max_grad_norm=args.clip,
            grad_sample_mode="ghost",
            noise_generator=torch.Generator().manual_seed(2),
        )
        done = 0
        t0 = time.perf_counter()
        while done < steps:
            for x, y in loader:
                optimizer.zero_grad()
                criterion(dp_model(x), y).backward()  # Opacus's two backward passes (ghost clipping)
                optimizer.step()
                done += 1
                if done == steps:
                    break
        secs = time.perf_counter() - t0
        dp_model.remove_hooks()
    finally:
        if use_dpkernels:
            dpkernels.opacus_backend.disable()
    return model, float(engine.get_epsilon(args.delta)), secs


def train_dpkernels(init, train, args, steps) -> tuple[nn.Module, float, float]:
    """C: dpkernels.make_private; Poisson batches from dpkernels.data.poisson_loader."""
    model = copy.deepcopy(init)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    q = args.batch / len(train)
    model, optimizer = dpkernels.make_private(
        model,
        optimizer,
        noise_multiplier=args.sigma,
        max_grad_norm=args.clip,
        sample_rate=q,
        dataset_size=len(train),
        seed=3,
    )
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for x, y in poisson_loader(train, q, steps=steps, generator=torch.Generator().manual_seed(1)):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()  # one backward: norms, clipping and noise happen inside it
        optimizer.step()
    return model, optimizer.accountant.get_epsilon(args.delta), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps each (for tests)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=64, help="expected (Poisson) batch size")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier")
    parser.add_argument("--clip", type=float, default=1.0, help="max per-sample gradient norm")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args(argv)

    train, test = load()
    steps = 5 if args.quick else round(args.epochs * len(train) / args.batch)
    torch.manual_seed(0)
    init = make_model()
    print(f"digits: {len(train)} train / {len(test)} test; {steps} steps, batch {args.batch}, sigma {args.sigma}")

    results: dict[str, dict[str, float]] = {}
    models = {}
    runs = {
        "A  Opacus (ghost)": lambda: train_opacus(init, train, args, steps, use_dpkernels=False),
        "B  Opacus + dpkernels.opacus_backend": lambda: train_opacus(init, train, args, steps, use_dpkernels=True),
        "C  dpkernels.make_private": lambda: train_dpkernels(init, train, args, steps),
    }
    for name, run in runs.items():
        model, eps, secs = run()  # secs: the training loop alone
        models[name[0]] = model
        results[name[0]] = {"accuracy": accuracy(model, test), "epsilon": eps, "seconds": secs}
        print(f"{name:40s} test accuracy {results[name[0]]['accuracy']:.3f}  epsilon {eps:.2f}  {secs:.1f} s")
    pairs = zip(models["A"].parameters(), models["B"].parameters(), strict=True)
    diff = max(float((p - q).detach().abs().max()) for p, q in pairs)
    results["A-B"] = {"max_param_diff": diff}
    print(f"A vs B: largest parameter difference {diff:.2e} (float32 rounding of the norms; same seeds)")
    return results


if __name__ == "__main__":
    main()
