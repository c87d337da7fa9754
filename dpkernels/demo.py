"""The demo: DP-SGD on scikit-learn's digits with a small CNN, next to the same training without DP.

    python -m dpkernels.demo                      # ~20-40 s on a 2-core CPU
    python -m dpkernels.demo --strategy two-pass --clipping automatic --groups layer-wise
    python -m dpkernels.demo --quick              # a few steps, for tests

The CNN (Conv2d + GroupNorm + ReLU, twice, then Linear) trains with `make_private` on Poisson
batches from `dpkernels.data.poisson_loader` to a target epsilon at delta = 1e-5; then the same
model, from the same initial weights, trains without DP for the same number of steps on the same
batches. Printed: test accuracy of both, the epsilon spent (the optimizer's accountant), the median
step time and the peak memory of a step for both, and their ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import dpkernels
from dpkernels import ops
from dpkernels.data import poisson_loader

DELTA = 1e-5
TEST_FRACTION = 0.25
SPLIT_SEED = 0  # the train/test split is fixed; --seed changes initialisation, batches and noise
PROFILED_STEP = 1  # the step whose memory is measured (after one warm-up step); not timed


@dataclass
class DemoConfig:
    """What one demo run trains. The defaults reach ~95% test accuracy at epsilon = 3 (README)."""

    epochs: float = 10.0
    epsilon: float = 3.0
    device: str = "cpu"
    strategy: str = "bk"
    groups: str = "all-layer"
    clipping: str = "abadi"
    seed: int = 0
    batch_size: int = 256  # expected: sample_rate = batch_size / len(train)
    lr: float = 0.1
    max_grad_norm: float = 1.0
    channels: tuple[int, int] = (16, 32)


@dataclass
class RunResult:
    """What one training run (DP or not) measured."""

    accuracy: float
    steps: int
    step_times: list[float] = field(default_factory=list)  # seconds, every step but the profiled one
    peak_bytes: int | None = None
    memory_label: str = ""
    epsilon: float | None = None
    noise_multiplier: float | None = None
    dp_setup: str = ""  # read back from the engine, not from the config
    norm_report: str = ""

    @property
    def median_step_time(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")


def load_digits_split() -> tuple[TensorDataset, Tensor, Tensor]:
    """scikit-learn's digits (1797 8x8 images, 10 classes), split 75/25 with a fixed seed, stratified.

    Pixels (0..16) map to [-1, 1] by a fixed affine map: statistics of the training set (a mean,
    a std) would themselves be a release about the data that the privacy accounting does not cover.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)

    def images(a) -> Tensor:
        return torch.tensor(a / 8.0 - 1.0, dtype=torch.float32).view(-1, 1, 8, 8)

    def labels(a) -> Tensor:
        return torch.tensor(a, dtype=torch.long)

    return TensorDataset(images(x_tr), labels(y_tr)), images(x_te), labels(y_te)


def make_cnn(channels: tuple[int, int] = (16, 32), num_classes: int = 10) -> nn.Module:
    """(B, 1, 8, 8) -> logits: [Conv3x3 -> GroupNorm -> ReLU] x 2 (the second with stride 2) -> Linear.

    GroupNorm, not BatchNorm: batch statistics mix samples, so BatchNorm has no per-sample gradient
    and `make_private` refuses it.
    """
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.GroupNorm(4, c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1, stride=2),
        nn.GroupNorm(4, c2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 4 * 4, num_classes),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# What the profiler's C++ side prints on a machine without a GPU: kineto's log lines
# ("USDT:...", "ERROR:... gpuGetDeviceCount failed") and the allocator's note that a block allocated
# before profiling was freed (such frees are not counted, so the peak can only be over-, not under-stated).
_CHATTER = re.compile(r"^(USDT|STAGE|INFO|WARNING|ERROR):\d{4}-\d\d-\d\d |Memory block of unknown size")


@contextlib.contextmanager
def _without_profiler_chatter():
    """Capture file descriptor 2 (C++ writes there directly) and pass on every line but the profiler's chatter."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not _CHATTER.search(line):
                    sys.stderr.write(line)


def measure_peak_bytes(step: Callable[[], None], device: torch.device) -> tuple[int | None, str]:
    """Run ``step`` once and return (peak bytes, what was measured).

    CUDA: torch.cuda.max_memory_allocated, which counts everything allocated (weights, optimizer
    state, batch) at the peak of the step. CPU: torch has no allocator peak, so the profiler's
    memory events (each tensor allocation and free, in time order) are summed, and the peak of the
    running total is the most tensor memory the step held on top of what was live before it.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated during a step (all tensors)"
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_chatter():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        # Raw allocator events (the FunctionEvent view folds them into the ops that made them).
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, "peak tensor bytes a step allocates above those live before it (torch.profiler memory events, CPU)"


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy."""
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc


def train(
    cfg: DemoConfig,
    *,
    dp: bool = True,
    data: tuple[TensorDataset, Tensor, Tensor] | None = None,
    model: nn.Module | None = None,
    progress: bool = True,
    measure: bool = True,
) -> RunResult:
    """Train ``model`` (default: a fresh `make_cnn` seeded by cfg.seed) on Poisson batches; test it.

    DP: `make_private` calibrates sigma so that ceil(epochs / q) steps at sample rate
    q = batch_size / len(train) spend cfg.epsilon at delta = 1e-5, with cfg's strategy, clipping
    groups and clip function. Non-DP: plain SGD on the same batches (same generator seed), same steps.
    ``measure``: time every step and measure the memory of step `PROFILED_STEP`.
    """
    device = torch.device(cfg.device)
    train_set, x_test, y_test = data if data is not None else load_digits_split()
    n = len(train_set)
    q = cfg.batch_size / n
    steps = math.ceil(cfg.epochs / q)  # what make_private(epochs=...) accounts for
    if model is None:
        torch.manual_seed(cfg.seed)
        model = make_cnn(cfg.channels)
    model = model.to(device)
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    private: dpkernels.DPOptimizer | None = None
    if dp:
        model, private = dpkernels.make_private(
            model,
            optimizer,
            target_epsilon=cfg.epsilon,
            target_delta=DELTA,
            sample_rate=q,
            dataset_size=n,
            epochs=cfg.epochs,
            max_grad_norm=cfg.max_grad_norm,
            clipping=cfg.clipping,
            groups=cfg.groups,
            strategy=cfg.strategy,
            seed=cfg.seed,
        )
        optimizer = private
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = poisson_loader(train_set, q, steps=steps, generator=generator)

    def step(xb: Tensor, yb: Tensor) -> None:
        if private is not None:
            # The (B,) per-sample losses: the engine backpropagates their sum (each G row exactly sample i's,
            # also in 16 bits, where a scalar mean loss is refused) and divides by the expected batch size.
            # An empty batch is still a step: the update is noise only (and the accountant counts it).
            losses = F.cross_entropy(model(xb), yb, reduction="none")
            private.backward(losses)  # for two-pass: a norms pass, then a clipping pass
            private.step()
        elif len(yb) > 0:  # without DP an empty batch has no gradient (its mean loss is nan)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = RunResult(accuracy=float("nan"), steps=steps)
    bar = _progress(steps, "DP-SGD" if dp else "non-DP", progress)
    for i, (xb, yb) in enumerate(loader):
        xb, yb = xb.to(device), yb.to(device)
        if measure and i == min(PROFILED_STEP, steps - 1):
            result.peak_bytes, result.memory_label = measure_peak_bytes(functools.partial(step, xb, yb), device)
        else:
            _sync(device)
            t0 = time.perf_counter()
            step(xb, yb)
            _sync(device)
            if measure:
                result.step_times.append(time.perf_counter() - t0)
        bar.update(1)
    bar.close()
    result.accuracy = evaluate(model, x_test.to(device), y_test.to(device))
    if private is not None:
        eng = private.engine
        result.epsilon = private.accountant.get_epsilon(DELTA)
        result.noise_multiplier = eng.noise_multiplier
        result.norm_report = eng.report()
        n_groups = len(eng.groups)
        plural = "s" if n_groups != 1 else ""
        result.dp_setup = (
            f"strategy={eng.strategy}, clipping={eng.clipping}, groups={cfg.groups} ({n_groups} clipping "
            f"group{plural}), R_total={eng.r_total:g}, noise multiplier={eng.noise_multiplier:.3f}"
        )
    return result


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False, file=sys.stderr)


def run_demo(cfg: DemoConfig, *, progress: bool = True) -> tuple[RunResult, RunResult]:
    """Train with DP, then without, from the same initial weights on the same batches."""
    data = load_digits_split()
    torch.manual_seed(cfg.seed)
    init = make_cnn(cfg.channels)
    dp = train(cfg, dp=True, data=data, model=copy.deepcopy(init), progress=progress)
    plain = train(cfg, dp=False, data=data, model=init, progress=progress)
    return dp, plain


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f} MiB"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def format_report(cfg: DemoConfig, dp: RunResult, plain: RunResult, n_train: int, n_test: int) -> str:
    """The demo's printout: setup, then a table DP vs non-DP."""
    device = torch.device(cfg.device)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu (torch threads: {torch.get_num_threads()})"
    )
    backends = ", ".join(sorted(set(ops.last_backend.values()))) or "-"
    q = cfg.batch_size / n_train
    rows = [
        ("test accuracy", f"{dp.accuracy:.1%}", f"{plain.accuracy:.1%}", ""),
        (f"epsilon (delta={DELTA:g})", f"{dp.epsilon:.2f}", "inf", ""),
        (
            "median step time",
            f"{dp.median_step_time * 1e3:.2f} ms",
            f"{plain.median_step_time * 1e3:.2f} ms",
            _ratio(dp.median_step_time, plain.median_step_time),
        ),
        ("peak step memory", _mib(dp.peak_bytes), _mib(plain.peak_bytes), _ratio(dp.peak_bytes, plain.peak_bytes)),
    ]
    table = [f"{'':24}{'DP-SGD':>14}{'non-DP':>14}{'DP/non-DP':>12}"]
    table += [f"{name:24}{a:>14}{b:>14}{r:>12}".rstrip() for name, a, b, r in rows]
    return "\n".join(
        [
            f"dpkernels demo: CNN on scikit-learn digits ({n_train} train / {n_test} test images), device {where}",
            f"DP-SGD: {dp.dp_setup}, backend: {backends}",
            f"both: Poisson sampling q={q:.4f} (expected batch {cfg.batch_size}), {dp.steps} steps "
            f"(epochs={cfg.epochs:g}), SGD lr={cfg.lr} momentum=0.9, seed={cfg.seed}",
            "",
            *table,
            "",
            f"peak step memory: {dp.memory_label}",
            "step time: median over all steps but the profiled one; the same batches for both runs",
            "",
            "per-layer norm method (engine.report()):",
            dp.norm_report,
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[DemoConfig, argparse.Namespace]:
    defaults = DemoConfig()
    p = argparse.ArgumentParser(
        prog="dpkernels-demo",
        description="DP-SGD on scikit-learn's digits with a small CNN, compared with the same training without DP.",
    )
    p.add_argument("--epochs", type=float, default=defaults.epochs, help="passes over the data (in expectation)")
    p.add_argument("--epsilon", type=float, default=defaults.epsilon, help=f"target epsilon at delta={DELTA:g}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--strategy", choices=("bk", "two-pass"), default=defaults.strategy)
    p.add_argument("--groups", choices=("all-layer", "layer-wise", "param-wise"), default=defaults.groups)
    p.add_argument("--clipping", choices=("abadi", "automatic"), default=defaults.clipping)
    p.add_argument("--seed", type=int, default=defaults.seed, help="initial weights, batches and noise")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="expected Poisson batch size")
    p.add_argument("--lr", type=float, default=defaults.lr)
    # One thread by default: this CNN's ops are too small for intra-op parallelism to pay, and on a busy
    # machine two spinning OpenMP threads made every step ~10x slower (load average ~9 on 2 cores:
    # non-DP median step 361 ms with 2 threads, 33 ms with 1).
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0: torch's default)")
    p.add_argument("--quick", action="store_true", help="one epoch: a few steps, for tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    cfg = DemoConfig(
        epochs=1.0 if a.quick else a.epochs,
        epsilon=a.epsilon,
        device=a.device,
        strategy=a.strategy,
        groups=a.groups,
        clipping=a.clipping,
        seed=a.seed,
        batch_size=a.batch_size,
        lr=a.lr,
    )
    return cfg, a


def main(argv: Sequence[str] | None = None) -> int:
    """The console script ``dpkernels-demo`` (and ``python -m dpkernels.demo``)."""
    cfg, args = parse_args(argv)
    threads = torch.get_num_threads()
    absl = logging.getLogger("absl")
    absl_level = absl.level
    try:  # thread count and log level are restored: main() may be called from a test process
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        # dp-accounting's RDP calibration logs a warning per order it drops while bracketing sigma.
        absl.setLevel(logging.ERROR)
        t0 = time.perf_counter()
        dp, plain = run_demo(cfg, progress=not args.no_progress)
        train_set, x_test, _ = load_digits_split()
        print(format_report(cfg, dp, plain, len(train_set), len(x_test)))
        print(f"\ntotal time: {time.perf_counter() - t0:.1f} s")
    finally:
        torch.set_num_threads(threads)
        absl.setLevel(absl_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
