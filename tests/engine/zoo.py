"""Small float64 models, one per DP layer type, and the naive per-sample-gradient oracle.

Each `Case` builds a model of plain torch layers (make_private converts them), draws a
batch, and defines the per-sample loss l_i. The oracle is the suite's one (tests/oracle.py): the
autograd gradient of each l_i on a batch of one, in float64, on an unconverted copy of the model.
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import oracle
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dpkernels

DT = torch.float64
OUT = 4  # outputs per position: the smallest parameter (a head bias) has OUT values


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    # (batch size, generator) -> (x, y), inputs scaled so that per-sample norms are O(1) and distinct
    data: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
    # (model output, y) -> (B,) per-sample losses
    loss: Callable[[Tensor, Tensor], Tensor]
    needs: tuple[type[nn.Module], ...] = (nn.Linear,)
    tied: bool = False  # shares a parameter between two DP layers (needs dpkernels.functional.tied)

    def __repr__(self) -> str:
        return self.name


def _sq_loss(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).square().flatten(1).sum(1)


def _ce_loss(out: Tensor, y: Tensor) -> Tensor:
    # (B, T, V) logits, (B, T) targets -> sum over positions
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    @functools.wraps(build)
    def wrapped() -> nn.Module:
        torch.manual_seed(0)
        return build().to(DT)

    return wrapped


def _randn(*shape: int, g: torch.Generator, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=g, dtype=DT)


class _Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class _MeanTokens(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


def _mlp() -> nn.Module:
    # T = 3 positions per sample (a (B, T, d) input), odd widths
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, OUT))


def _mlp_frozen() -> nn.Module:
    m = _mlp()
    m[0].bias.requires_grad_(False)  # part of a layer frozen
    for p in m[2].parameters():  # a whole layer frozen: no per-sample work for it
        p.requires_grad_(False)
    return m


def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(3, 8, 3, stride=2, padding=1), nn.Tanh(), _Flatten(), nn.Linear(8 * 4, OUT))


def _conv2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1, dilation=1), nn.Tanh(), nn.Conv2d(8, 8, 3, stride=2, groups=2, bias=False),
        _Flatten(), nn.Linear(8 * 2 * 2, OUT)
    )  # fmt: skip


def _conv3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 8, 2, stride=1), nn.Tanh(), _Flatten(), nn.Linear(8 * 2 * 2 * 2, OUT))


def _embedding() -> nn.Module:
    # vocab 20, tokens drawn from [0, 12): rows 12..19 are never touched; 0 is the padding row
    return nn.Sequential(nn.Embedding(20, 8, padding_idx=0), _MeanTokens(), nn.Linear(8, OUT))


def _layernorm() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, OUT))


def _rmsnorm() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.RMSNorm(8), nn.Tanh(), nn.Linear(8, OUT))


def _groupnorm() -> nn.Module:
    # (B, C=8, L=4) input: 2 groups of 4 channels, normalised over channels and positions
    return nn.Sequential(nn.GroupNorm(2, 8), nn.Tanh(), _Flatten(), nn.Linear(8 * 4, OUT))


class _TiedLM(nn.Module):
    """Embedding and output head share one matrix (GPT-2's wte / lm_head)."""

    def __init__(self, vocab: int = 13, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x))))


def _seq_data(d_in: int, d_out: int, T: int = 3) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    return lambda B, g: (_randn(B, T, d_in, g=g, scale=2.0), _randn(B, T, d_out, g=g))


def _img_data(*shape: int) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    return lambda B, g: (_randn(B, *shape, g=g, scale=2.0), _randn(B, OUT, g=g))


def _token_data(vocab: int, T: int, d_out: int) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    def data(B: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, vocab, (B, T), generator=g)
        return x, _randn(B, d_out, g=g)

    return data


def _lm_data(vocab: int, T: int) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    def data(B: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)

    return data


CASES = [
    Case("mlp", _seeded(_mlp), _seq_data(5, OUT), _sq_loss),
    Case("mlp_frozen", _seeded(_mlp_frozen), _seq_data(5, OUT), _sq_loss),
    Case("conv1d", _seeded(_conv1d), _img_data(3, 7), _sq_loss, (nn.Linear, nn.Conv1d)),
    Case("conv2d", _seeded(_conv2d), _img_data(2, 5, 5), _sq_loss, (nn.Linear, nn.Conv2d)),
    Case("conv3d", _seeded(_conv3d), _img_data(2, 3, 3, 3), _sq_loss, (nn.Linear, nn.Conv3d)),
    Case("embedding", _seeded(_embedding), _token_data(12, 5, OUT), _sq_loss, (nn.Linear, nn.Embedding)),
    Case("layernorm", _seeded(_layernorm), _seq_data(5, OUT), _sq_loss, (nn.Linear, nn.LayerNorm)),
    Case("rmsnorm", _seeded(_rmsnorm), _seq_data(5, OUT), _sq_loss, (nn.Linear, nn.RMSNorm)),
    Case("groupnorm", _seeded(_groupnorm), _img_data(8, 4), _sq_loss, (nn.Linear, nn.GroupNorm)),
    Case("tied", _seeded(_TiedLM), _lm_data(13, 4), _ce_loss, (nn.Linear, nn.Embedding), tied=True),
]
BY_NAME = {c.name: c for c in CASES}


def missing(case: Case) -> list[str]:
    """What this checkout lacks to run ``case`` (layers written by other work in progress)."""
    out = [t.__name__ for t in case.needs if t not in dpkernels.DP_LAYERS]
    if case.tied:
        try:
            importlib.import_module("dpkernels.functional.tied")
        except ImportError:
            out.append("dpkernels.functional.tied")
    return out


def require(case: Case) -> None:
    lacking = missing(case)
    if lacking:
        pytest.skip(f"{case.name}: no DP support yet for {lacking}")


def batch(case: Case, B: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return case.data(B, g)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by (first) name; tied parameters once."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def owners(model: nn.Module) -> dict[str, str]:
    """Parameter name -> name of the module it belongs to (the first module, for tied ones)."""
    seen: dict[int, str] = {}
    for mname, m in model.named_modules():
        for p in m.parameters(recurse=False):
            seen.setdefault(id(p), mname)
    return {n: seen[id(p)] for n, p in trainable(model).items()}


def per_sample_grads(model: nn.Module, case: Case, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Naive oracle (tests/oracle.py): d l_i / d theta for each sample i, on a copy. (B, *param.shape) each."""
    return oracle.per_sample_grads(copy.deepcopy(model), lambda m, s: case.loss(m(s[0]), s[1]), (x, y))


def batch_loss(case: Case, out: Tensor, y: Tensor, reduction: str) -> Tensor:
    per = case.loss(out, y)
    return per.mean() if reduction == "mean" else per.sum()


def flat(grads: dict[str, Tensor]) -> Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def dp_module_names(model: nn.Module) -> list[str]:
    """Modules with a trainable parameter of their own (a tied head included), in model order."""
    return [n for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def reference_groups(model: nn.Module, spec) -> list[list[str]]:
    """Parameter names per clipping group, written independently of dpkernels.clipping.

    A parameter belongs to the group of the first module (in model order) that owns it.
    List specs keep the user's group order (their bounds are given in that order).
    """
    own = owners(model)
    names = list(own)
    if spec == "all-layer":
        return [names]
    if spec == "param-wise":
        return [[n] for n in names]
    if spec == "layer-wise":
        key = own
    elif callable(spec):
        key = {n: spec(own[n], model.get_submodule(own[n])) for n in names}
    else:
        return [[n for n in names if own[n] in set(mods)] for mods in spec]
    out: dict = {}
    for n in names:
        out.setdefault(key[n], []).append(n)
    return list(out.values())


clip = oracle.clip  # the clip functions of docs/design.md (section 3), written out again for the oracle


def reference_update(
    ps: dict[str, Tensor],
    groups: list[list[str]],
    bounds: list[float],
    clipping: str,
    divide_by: float,
) -> dict[str, Tensor]:
    """sum_i c_{i,g} grad_i / divide_by, with c_{i,g} from the per-sample norm over group g."""
    return oracle.clipped_update(ps, groups, bounds, divide_by, clipping)


def group_norms(ps: dict[str, Tensor], groups: list[list[str]]) -> Tensor:
    """(G, B) per-sample gradient norm over each group."""
    return torch.stack([torch.stack([ps[k].flatten(1).square().sum(1) for k in g]).sum(0).sqrt() for g in groups])
