"""dpkernels.opacus_backend: dpkernels' norms inside Opacus's ghost clipping give Opacus's training.

With noise_multiplier = 0 and clipping active, a few Opacus steps with `enable()` must reach the
parameters that Opacus alone reaches (float64), and the per-sample norms Opacus clips with must be
the naive per-sample gradient norms. `disable()` must leave Opacus's registry as it found it.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import oracle
import pytest
import torch
from opacus import PrivacyEngine  # noqa: E402
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (  # noqa: E402
    GradSampleHooksFastGradientClipping,
)
from torch import nn

from dpkernels import api, opacus_backend  # noqa: E402

DT = torch.float64
V, L, N, BATCH = 13, 16, 12, 4


class Net(nn.Module):
    """Embedding -> Conv2d -> GroupNorm -> Conv1d -> LayerNorm -> RMSNorm -> Linear over token ids (B, 16)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 6)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        # contiguous(): Opacus's own Conv2d grad sampler is wrong on strided (channels-last) inputs, see below
        h = self.emb(ids).transpose(1, 2).reshape(ids.shape[0], 6, 4, 4).contiguous()
        h = torch.tanh(self.gn(self.conv(h)))
        h = self.conv1(h.flatten(2)).transpose(1, 2)  # (B, 16, 8)
        return self.head(self.rms(self.ln(h))).mean(1)


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (N, L), generator=gen), torch.randint(0, 5, (N,), generator=gen)


def _model():
    torch.manual_seed(0)
    m = Net().to(DT)
    with torch.no_grad():  # norm layers' affine parameters away from 1 and 0
        for mod in (m.gn, m.ln, m.rms):
            for p in mod.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return m


def _naive_norms(model, x, y):
    """Per-sample total gradient norms (tests/oracle.py)."""
    ps = oracle.per_sample_grads(model, lambda m, s: nn.functional.cross_entropy(m(s[0]), s[1]), (x, y))
    return oracle.sq_norms(ps).sqrt()


def _train(model, R, reduction, steps=3):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    m, opt, crit, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        criterion=nn.CrossEntropyLoss(reduction=reduction),
        noise_multiplier=0.0,
        max_grad_norm=R,
        poisson_sampling=False,
        grad_sample_mode="ghost",
        loss_reduction=reduction,
    )
    norms = []
    for _, (xb, yb) in zip(range(steps), loader):
        opt.zero_grad()
        crit(m(xb), yb).backward()
        norms.append(m.per_sample_gradient_norms.detach().clone())
        opt.step()
    m.remove_hooks()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


@pytest.fixture
def registry():
    """Opacus's registry, checked to be left exactly as it was (the test's own disable() included)."""
    saved = dict(GradSampleHooksFastGradientClipping.NORM_SAMPLERS)
    yield GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    opacus_backend.disable()
    assert GradSampleHooksFastGradientClipping.NORM_SAMPLERS == saved


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_same_training_as_opacus(registry, reduction, monkeypatch):
    x, y = _data()
    init = _model()
    naive0 = _naive_norms(init, x[:BATCH], y[:BATCH])
    R = float(naive0.median())  # about half of the first batch is clipped
    base_params, base_norms = _train(copy.deepcopy(init), R, reduction)

    seen: set[str] = set()
    inner = api.per_sample_norms

    def spy(layer, activations, backprops, **kw):
        seen.add(type(layer).__name__)
        return inner(layer, activations, backprops, **kw)

    monkeypatch.setattr(api, "per_sample_norms", spy)
    with opacus_backend.enable():
        assert opacus_backend.is_enabled() and registry[nn.Conv2d] is opacus_backend.norm_sampler
        params, norms = _train(copy.deepcopy(init), R, reduction)
    assert not opacus_backend.is_enabled()
    # Every layer type went through dpkernels (Conv and the norm layers instead of Opacus's instantiation).
    assert seen == {"Embedding", "Conv2d", "GroupNorm", "Conv1d", "LayerNorm", "RMSNorm", "Linear"}

    # The norms Opacus clips with: NOT squared, the naive per-sample norms of the per-sample losses (for a
    # mean loss too: Opacus rescales the output gradient by B before calling the sampler).
    # float64 sums of a few hundred O(1) products in another order: errors ~1e-14 relative; 1e-9 is ample.
    torch.testing.assert_close(norms[0], naive0, rtol=1e-9, atol=1e-12)
    assert bool((norms[0] > R).any()) and bool((norms[0] < R).any())  # clipping active, and not on all
    for a, b in zip(norms, base_norms):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # Three SGD steps of a smooth float64 model amplify those ~1e-14 differences by O(lr * curvature) per
    # step at most; 1e-9 stays far above that and far below any real divergence (parameters move by ~0.1).
    moved = max(float((base_params[n] - p).abs().max()) for n, p in init.named_parameters())
    assert moved > 1e-3
    for n in params:
        torch.testing.assert_close(params[n], base_params[n], rtol=1e-9, atol=1e-12, msg=lambda s, n=n: f"{n}: {s}")


def test_enable_disable_registry(registry):
    before = dict(registry)
    assert registry.get(nn.Linear) is not None  # Opacus's own Linear and Embedding samplers are there
    opacus_backend.enable()
    for t in opacus_backend.DEFAULT_LAYERS:
        assert registry[t] is opacus_backend.norm_sampler
    with pytest.raises(RuntimeError, match="already enabled"):
        opacus_backend.enable()
    opacus_backend.disable()
    assert registry == before  # Opacus's samplers back, the types it had none for removed
    opacus_backend.disable()  # a second disable is a no-op
    assert registry == before

    opacus_backend.enable(layers=[nn.Conv2d])
    assert registry[nn.Conv2d] is opacus_backend.norm_sampler and registry.get(nn.Linear) is before[nn.Linear]
    sentinel = object()
    registry[nn.Conv2d] = sentinel  # someone registers their own sampler after enable(): theirs is kept
    opacus_backend.disable()
    assert registry.pop(nn.Conv2d) is sentinel
    assert registry == before

    with pytest.raises(TypeError, match="BatchNorm2d"):
        opacus_backend.enable(layers=[nn.BatchNorm2d])
    assert not opacus_backend.is_enabled()


def test_norm_sampler_convention():
    """{param: (B,) sqrt of dpkernels' squared norms}, frozen parameters left out, as Opacus's samplers."""
    lin = nn.Linear(3, 2).to(DT)
    lin.bias.requires_grad_(False)
    a, g = torch.randn(4, 5, 3, dtype=DT), torch.randn(4, 5, 2, dtype=DT)
    out = opacus_backend.norm_sampler(lin, [a], g)
    assert list(out) == [lin.weight]
    sq = api.per_sample_norms(lin, a, g)[lin.weight]
    torch.testing.assert_close(out[lin.weight], sq.sqrt(), rtol=0, atol=0)


def test_channels_last_conv(registry):
    """A channels-last Conv2d input: the norms Opacus clips with under enable() are the naive ones.

    (Opacus 1.6's own Conv2d grad sampler unfolds with as_strided assuming a contiguous input and gets
    these per-sample gradients wrong; measured here: errors of ~12 on gradients of norm ~10.)"""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(DT)
    x = torch.randn(5, 3, 6, 6, dtype=DT).to(memory_format=torch.channels_last)
    U = torch.randn(5, 4, 6, 6, dtype=DT)
    naive = torch.stack(
        [
            torch.sqrt(
                sum(
                    g.square().sum()
                    for g in torch.autograd.grad((conv(x[i : i + 1]) * U[i]).sum(), [conv.weight, conv.bias])
                )
            )
            for i in range(5)
        ]
    )
    with opacus_backend.enable():
        gsm = GradSampleModuleFastGradientClipping(conv, loss_reduction="sum", max_grad_norm=1.0)
        (gsm(x) * U).sum().backward()
        got = gsm.get_norm_sample()
        gsm.remove_hooks()
    torch.testing.assert_close(got, naive, rtol=1e-9, atol=1e-12)  # float64, as above


def test_import_has_no_side_effect():
    code = (
        "import sys, dpkernels, dpkernels.opacus_backend, dpkernels.api; "
        "assert 'opacus' not in sys.modules, 'importing dpkernels imported opacus'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
