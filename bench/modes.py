"""Training modes the harness compares: non-DP, dpkernels (per backend), Opacus and fastDP.

A mode turns a `Workload` into a `Runner`: the (possibly wrapped) model, its optimizer and the
one call that does a whole step's backward. Every DP mode uses the same privacy settings
(noise multiplier 1.0, clipping bound 1.0, flat "abadi"-style clipping, mean loss, expected batch =
the batch), so the work per step is comparable. The dpkernels modes take the mean as the (B,)
per-sample losses (`per_sample_loss`, given to ``optimizer.backward``): dpkernels refuses a scalar
mean loss whose output gradients pass through 16 bits (bf16 autocast, a bf16 model), since each was
rounded as g_i / B and so depends on the batch size. What a mode had to change in the model for its
library (Opacus: ModuleValidator.fix, in-place activations) is returned in ``Runner.changes``.

Mode names: ``nondp``; ``dpk-bk:<backend>``, ``dpk-two-pass:<backend>``, ``dpk-layer-wise:<backend>``
with <backend> one of dpkernels.available_backends(); ``opacus-hooks``, ``opacus-ghost``;
``fastdp-bk`` (fastDP clipping_mode="ghost", i.e. base book-keeping) and ``fastdp-mixopt``
(clipping_mode="MixOpt", hybrid book-keeping, fastDP's default).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import Workload

NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
DPK_MODES = {  # name -> (clipping groups, strategy)
    "dpk-bk": ("all-layer", "bk"),
    "dpk-two-pass": ("all-layer", "two-pass"),
    "dpk-layer-wise": ("layer-wise", "bk"),
}
OPACUS_MODES = {"opacus-hooks": "hooks", "opacus-ghost": "ghost"}
FASTDP_MODES = {"fastdp-bk": "ghost", "fastdp-mixopt": "MixOpt"}
FASTDP_SKIP = "skipped: fastDP needs --fastdp-path (the directory holding its fastDP/ package)"


@dataclass
class Runner:
    """What one training step needs: the model to call, the optimizer and the backward of a loss."""

    model: nn.Module
    optimizer: Any
    backward: Callable[[Any], None] = lambda loss: loss.backward()
    criterion: Callable[..., Tensor] | None = None  # replaces F.cross_entropy (Opacus ghost's per-sample wrapper)
    per_sample: bool = False  # backward takes the (B,) per-sample losses (`per_sample_loss`), not their mean
    changes: list[str] = field(default_factory=list)  # what the mode changed in the model
    info: Callable[[], dict[str, Any]] = dict  # read after the run (backends that served, norm methods)


@dataclass
class Context:
    device: str
    batch: int
    lr: float = 1e-4
    fastdp_path: str | None = None


def per_sample_loss(work: Workload, out: Tensor) -> Tensor:
    """(B,) losses l_i = the mean cross-entropy over sample i's output positions: their mean is the workload's
    mean cross-entropy (every sample has the same number of positions)."""
    flat = F.cross_entropy(out.reshape(-1, out.shape[-1]), work.y.reshape(-1), reduction="none")
    return flat.view(out.shape[0], -1).mean(1)


def family(mode: str) -> str:
    if mode == "nondp":
        return "nondp"
    if mode.split(":")[0] in DPK_MODES:
        return "dpkernels"
    if mode in OPACUS_MODES:
        return "opacus"
    if mode in FASTDP_MODES:
        return "fastdp"
    raise ValueError(
        f"unknown mode {mode!r}; known: nondp, {', '.join(DPK_MODES)} (':<backend>'), "
        f"{', '.join(OPACUS_MODES)}, {', '.join(FASTDP_MODES)}"
    )


def dpk_backends(device: str) -> list[str]:
    """The dpkernels backends a run on ``device`` covers: Triton and the CUDA extension only on CUDA."""
    import dpkernels

    avail = dpkernels.available_backends()
    return [b for b in avail if device == "cuda" or b == "reference"]


def expand(spec: list[str], device: str, fastdp_path: str | None) -> tuple[list[str], list[str]]:
    """Expand a mode list ("all", families, "dpk-bk" -> every backend) into (modes to run, fastDP modes skipped
    for want of --fastdp-path)."""
    out: list[str] = []
    skipped: list[str] = []

    def add(m: str) -> None:
        if m not in out:
            out.append(m)

    for item in spec:
        item = item.strip()
        if not item:
            continue
        if item == "all":
            names = ["nondp", *DPK_MODES, *OPACUS_MODES, *FASTDP_MODES]
        elif item in ("dpk", "dpkernels"):
            names = list(DPK_MODES)
        elif item == "opacus":
            names = list(OPACUS_MODES)
        elif item == "fastdp":
            names = list(FASTDP_MODES)
        else:
            names = [item]
        for name in names:
            fam = family(name)
            if fam == "dpkernels" and ":" not in name:
                for b in dpk_backends(device):
                    add(f"{name}:{b}")
            elif fam == "fastdp" and not fastdp_path:
                if name not in skipped:
                    skipped.append(name)
            else:
                add(name)
    if "nondp" in out:  # the baseline first: its numbers are the denominators of every ratio
        out.remove("nondp")
        out.insert(0, "nondp")
    return out, skipped


def imports(mode: str, fastdp_path: str | None) -> None:
    """Import what a mode needs, before the worker takes its memory baseline."""
    fam = family(mode)
    if fam == "dpkernels":
        import dpkernels  # noqa: F401
    elif fam == "opacus":
        import opacus  # noqa: F401
    elif fam == "fastdp":
        if not fastdp_path:
            raise RuntimeError(FASTDP_SKIP)
        if fastdp_path not in sys.path:
            sys.path.insert(0, fastdp_path)
        import fastDP  # noqa: F401


def _sgd(model: nn.Module, ctx: Context) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=ctx.lr)


def setup(mode: str, work: Workload, ctx: Context) -> Runner:
    """Prepare ``work.model`` for ``mode``; returns the Runner the timing loop drives."""
    fam = family(mode)
    if fam == "nondp":
        return Runner(work.model, _sgd(work.model, ctx))
    if fam == "dpkernels":
        return _dpkernels(mode, work, ctx)
    if fam == "opacus":
        return _opacus(mode, work, ctx)
    return _fastdp(mode, work, ctx)


def _dpkernels(mode: str, work: Workload, ctx: Context) -> Runner:
    import dpkernels
    from dpkernels import ops

    name, _, backend = mode.partition(":")  # no backend named: dpkernels' automatic choice
    groups, strategy = DPK_MODES[name]
    ops.last_backend.clear()  # served_by names this run's ops only, not an earlier run's in this process
    model, opt = dpkernels.make_private(
        work.model,
        _sgd(work.model, ctx),
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=float(ctx.batch),
        groups=groups,
        strategy=strategy,
        backend=backend or None,
        seed=0,
    )

    def info() -> dict[str, Any]:
        methods: dict[str, int] = {}
        for m in opt.engine.modules.values():
            key = f"{type(m).__name__}:{getattr(m, 'dp_norm_method', '-')}"
            methods[key] = methods.get(key, 0) + 1
        # The backend that actually served each op: an op a backend lacks falls back to the reference.
        return {"served_by": dict(ops.last_backend), "norm_methods": methods}

    return Runner(model, opt, backward=opt.backward, per_sample=True, info=info)


def _non_inplace(model: nn.Module) -> list[str]:
    """Turn off ``inplace`` on activations (Opacus' full backward hooks reject in-place ops on hooked outputs)."""
    names = []
    for name, m in model.named_modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            names.append(name)
    return names


def _out_of_place_residuals(model: nn.Module) -> list[str]:
    """torchvision's BasicBlock/Bottleneck do ``out += identity`` on a norm layer's output, which Opacus' full
    backward hooks reject; give those blocks an out-of-place forward (same math)."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:
        return []

    def basic(self: Any, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)

    def bottleneck(self: Any, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)

    names = []
    for name, m in model.named_modules():
        if type(m) in (BasicBlock, Bottleneck):
            m.forward = (basic if type(m) is BasicBlock else bottleneck).__get__(m)
            names.append(name)
    return names


def _opacus(mode: str, work: Workload, ctx: Context) -> Runner:
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    model = work.model
    changes = []
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        model = ModuleValidator.fix(model).to(ctx.device)
        changes.append("ModuleValidator.fix: " + "; ".join(sorted({str(e) for e in errors})))
    blocks = _out_of_place_residuals(model)
    if blocks:
        changes.append(f"out-of-place residual add in {len(blocks)} ResNet block(s)")
    inplace = _non_inplace(model)
    if inplace:
        changes.append(
            f"inplace=False on {len(inplace)} activation module(s): {', '.join(inplace[:6])}"
            + (", ..." if len(inplace) > 6 else "")
        )
    # Opacus takes its expected batch size from the loader (len(dataset) / len(loader)); batches come from the
    # workload, the loader only carries the sampling rate. No Poisson sampling: fixed-size batches as elsewhere.
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(ctx.batch * 100, 1)), batch_size=ctx.batch
    )
    engine = PrivacyEngine()
    kind = OPACUS_MODES[mode]
    out = engine.make_private(
        module=model,
        optimizer=_sgd(model, ctx),
        data_loader=loader,
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        poisson_sampling=False,
        grad_sample_mode=kind,
        criterion=nn.CrossEntropyLoss(),
    )
    if kind == "ghost":
        gmodel, opt, criterion, _ = out
        return Runner(gmodel, opt, criterion=criterion, changes=changes)
    gmodel, opt, _ = out
    return Runner(gmodel, opt, changes=changes)


def _fastdp(mode: str, work: Workload, ctx: Context) -> Runner:
    if ctx.fastdp_path and ctx.fastdp_path not in sys.path:
        sys.path.insert(0, ctx.fastdp_path)
    from fastDP import PrivacyEngine

    model = work.model
    opt = _sgd(model, ctx)
    engine = PrivacyEngine(
        model,
        batch_size=ctx.batch,
        sample_size=ctx.batch * 100,
        noise_multiplier=NOISE_MULTIPLIER,
        epochs=1,
        max_grad_norm=MAX_GRAD_NORM,
        clipping_fn="Abadi",
        clipping_mode=FASTDP_MODES[mode],
        clipping_style="all-layer",
        loss_reduction="mean",
        origin_params=None,
    )
    engine.attach(opt)
    return Runner(model, opt, changes=[])
