"""Parameters shared by several DP layers (functional/tied.py): one noiseless DP step equals the naively
clipped sum of per-sample gradients of the SUMMED contributions (a loop over samples with torch's autograd
on an unconverted copy, float64), for loss reduction "mean" and "sum"; unsupported ties are refused.

Tolerance (float64): the engine sums in other orders than the oracle (ghost norms, unique keys, the cross
term), a few ulps times < 1e4 terms, < 1e-11 relative; rtol=1e-9 keeps a margin while a wrong clip
factor (the abadi epsilon alone is 1e-6 relative), a missing cross term or summed per-use norms fail.
"""

from __future__ import annotations

import copy
import math

import oracle
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpkernels

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)
EBS = 2.5  # != any realised batch, so dividing by the realised size fails


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: on the shared 2-core machine torch's intra-op threads spin (ms per op under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ce_loss(out, y):
    """(B, T, V) logits, (B, T) targets -> (B,) per-sample losses."""
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)


def sq_loss(out, y):
    return (out - y).square().flatten(1).sum(1)


def per_sample_grads(ref, x, y, loss_fn):
    """{name: (B, *shape)} gradients of each sample's loss (the suite's oracle, tests/oracle.py)."""
    return oracle.per_sample_grads(ref, lambda m, s: loss_fn(m(s[0]), s[1]), (x, y))


sq_norms = oracle.sq_norms


def clipped_sum(grads, groups, bounds):
    """Each group clipped (abadi) at its bound independently of dpkernels.clipping, and summed."""
    return oracle.clipped_update(grads, groups, bounds)


def private(model, R, red="mean", **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    kw.setdefault("noise_multiplier", 0.0)
    return dpkernels.make_private(model, opt, max_grad_norm=R, expected_batch_size=EBS, loss_reduction=red, **kw)


def group_names(model, engine):
    name = {id(p): n for n, p in model.named_parameters()}
    return [[name[id(p)] for p in ps] for ps in engine.groups]


def check_step(model, batches, loss_fn, red, **kw):
    """Noiseless DP step(s) on ``model`` (one per micro-batch in ``batches``) vs the oracle on a copy."""
    ref = copy.deepcopy(model)
    grads = [per_sample_grads(ref, x, y, loss_fn) for x, y in batches]
    norms = torch.cat([sq_norms(g, list(g)).sqrt() for g in grads])
    R = norms.median().item()  # some samples clipped, some not
    model, opt = private(model, R, red, accumulation_steps=len(batches), **kw)
    for x, y in batches:
        loss = loss_fn(model(x), y)
        opt.backward(loss.mean() if red == "mean" else loss.sum())
    opt.step()
    groups = group_names(model, opt.engine)
    sums = [clipped_sum(g, groups, opt.engine.bounds) for g in grads]
    for n, p in model.named_parameters():
        want = sum(s[n] for s in sums) / (EBS if red == "mean" else 1.0)
        torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m, n=n: f"{n}: {m}")
    return opt.engine, norms, R


class TinyGPT(nn.Module):
    """GPT-2's shape in miniature: wte tied to lm_head, wpe looked up with (1, T) position ids."""

    def __init__(self, V=11, T=6, D=5, pad=None, head_bias=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D, padding_idx=pad), nn.Embedding(T, D)
        self.ln_1, self.fc, self.ln_f = nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=head_bias)
        self.lm_head.weight = self.wte.weight

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device)[None]  # (1, T), as Hugging Face passes it
        h = self.wte(x) + self.wpe(pos)
        h = h + torch.tanh(self.fc(self.ln_1(h)))
        return self.lm_head(self.ln_f(h))


def lm_batch(B, T, V, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=gen)
    x[:, -1] = x[:, 0]  # repeated tokens
    return x, torch.randint(0, V, (B, T), generator=gen)


@pytest.mark.parametrize("red", ["mean", "sum"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"strategy": "two-pass"}, {"groups": "layer-wise"}, {"clipping": "abadi", "groups": "param-wise"}],
    ids=["bk", "two-pass", "layer-wise", "param-wise"],
)
def test_tiny_gpt2_tied_head_and_broadcast_positions(kw, red):
    torch.manual_seed(0)
    model = TinyGPT(pad=0).to(DT)
    engine, norms, R = check_step(model, [lm_batch(5, 6, 11, seed=1)], ce_loss, red, **kw)
    assert bool((norms > R).any()) and bool((norms < R).any())
    rep = engine.report()
    assert "tied-index+cross" in rep and "+cross" in rep.split("lm_head")[1]


def test_cross_term_matters():
    """The case above can fail: summing per-use squared norms (no cross term) is far from the true norm."""
    torch.manual_seed(0)
    tied = TinyGPT(pad=0).to(DT)
    untied = copy.deepcopy(tied)
    untied.lm_head.weight = nn.Parameter(untied.wte.weight.detach().clone())
    x, y = lm_batch(5, 6, 11, seed=1)
    gt = per_sample_grads(tied, x, y, ce_loss)["wte.weight"]
    gu = per_sample_grads(untied, x, y, ce_loss)
    dE, dH = gu["wte.weight"], gu["lm_head.weight"]
    torch.testing.assert_close(gt, dE + dH, **TOL)  # the tied gradient is the sum of the uses
    summed_norms = dE.flatten(1).square().sum(1) + dH.flatten(1).square().sum(1)
    true = gt.flatten(1).square().sum(1)
    assert ((true - summed_norms).abs() / true).max() > 1e-3  # 2 <dE, dH> is far above the tolerance


@pytest.mark.parametrize("red", ["mean", "sum"])
def test_accumulation_chains_prev_through_owners(red):
    """Two micro-batches: each owner's clipped sum of the tied table goes through ``prev``; noise (none here)
    and the scale come once, at the end."""
    torch.manual_seed(0)
    model = TinyGPT(pad=None, head_bias=True).to(DT)
    check_step(model, [lm_batch(3, 4, 11, seed=2), lm_batch(4, 4, 11, seed=3)], ce_loss, red)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 4)])
def test_small_batches(B, T):
    torch.manual_seed(B)
    model = TinyGPT(pad=1).to(DT)
    check_step(model, [lm_batch(B, T, 11, seed=B)], ce_loss, "sum")


class SharedLinears(nn.Module):
    """Linear layers sharing weights and/or biases; ``a`` is also used twice."""

    def __init__(self, share: str):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        if share in ("weight", "both"):
            self.b.weight = self.a.weight
        if share in ("bias", "both"):
            self.b.bias = self.a.bias

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h)) + self.a(h) * 0.5
        return self.c(h)


@pytest.mark.parametrize("share", ["weight", "bias", "both"])
@pytest.mark.parametrize("red", ["mean", "sum"])
def test_linear_ties(share, red):
    torch.manual_seed(0)
    model = SharedLinears(share).to(DT)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, generator=gen, dtype=DT)
    y = torch.randn(5, 3, 3, generator=gen, dtype=DT)
    engine, _, _ = check_step(model, [(x, y)], sq_loss, red)
    assert "tied-" in engine.report()


class SharedTables(nn.Module):
    """Encoder and decoder embeddings (different padding_idx) and the output head share one table; the head
    is skipped when ``use_head`` is False (then only the embeddings contribute)."""

    def __init__(self, V=9, D=4):
        super().__init__()
        self.enc, self.dec = nn.Embedding(V, D, padding_idx=0), nn.Embedding(V, D, padding_idx=1)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(D, V, bias=True)
        self.head.weight = self.enc.weight
        self.out = nn.Linear(D, V)
        self.use_head = True

    def forward(self, x):
        h = torch.tanh(self.enc(x) + self.dec(x.flip(1)))
        return self.head(h) if self.use_head else self.out(h)


@pytest.mark.parametrize("use_head", [True, False])
@pytest.mark.parametrize("red", ["mean", "sum"])
def test_two_embeddings_and_head(use_head, red):
    torch.manual_seed(0)
    model = SharedTables().to(DT)
    model.use_head = use_head
    x, y = lm_batch(4, 5, 9, seed=4)
    x[0, :2] = 0
    x[1, 1:3] = 1
    check_step(model, [(x, y)], ce_loss, red)


def test_tied_noise_added_once():
    """The tied table's noise has std sigma R / EBS: added once, not once per owner (sqrt(2) larger)."""
    sigma, R = 2.0, 0.5

    def grads(noise):
        torch.manual_seed(0)
        model = TinyGPT(V=1000, D=8).to(DT)
        model, opt = private(model, R, noise_multiplier=noise, seed=11)
        x, y = lm_batch(3, 4, 1000, seed=5)
        ce_loss(model(x), y).mean().backward()
        opt.step()
        return model.wte.weight.grad

    noise = grads(sigma) - grads(0.0)
    # n = 8000 Gaussians: the sample std has relative standard error 1/sqrt(2n) ~ 0.8%; 5% is > 6 SE and
    # far below the 41% of a second draw
    assert abs(noise.std().item() / (sigma * R / EBS) - 1) < 0.05
    assert abs(noise.mean().item()) < 5 * sigma * R / EBS / math.sqrt(noise.numel())


class SharedNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2, self.head = nn.LayerNorm(4), nn.LayerNorm(4), nn.Linear(4, 2)
        self.n2.weight = self.n1.weight

    def forward(self, x):
        return self.head(self.n2(self.n1(x)))


class NormAsBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.n, self.lin = nn.LayerNorm(4), nn.Linear(4, 4)
        self.lin.bias = self.n.weight

    def forward(self, x):
        return self.lin(self.n(x))


def test_unsupported_ties_are_refused():
    for model, names in ((SharedNorms(), ("'n1'", "'n2'")), (NormAsBias(), ("'n'", "'lin'"))):
        with pytest.raises(ValueError, match="share a trainable parameter") as err:
            private(model, 1.0)
        assert all(n in str(err.value) for n in names) and "Untie" in str(err.value)
    if nn.Conv1d in dpkernels.DP_LAYERS:
        convs = nn.Sequential(nn.Conv1d(2, 2, 1), nn.Conv1d(2, 2, 1))
        convs[1].weight = convs[0].weight
        with pytest.raises(ValueError, match="'0'.*'1'|'1'.*'0'"):
            private(convs, 1.0)


def test_tied_embedding_with_scale_grad_by_freq_is_refused():
    model = TinyGPT()
    model.wte.scale_grad_by_freq = True
    with pytest.raises(ValueError, match="scale_grad_by_freq=False"):
        private(model, 1.0)
