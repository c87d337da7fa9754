"""DPEmbedding: torch's forward/state_dict, refusals, broadcast position ids, dense noise, and one
noiseless DP step equal to the naively clipped sum of per-sample gradients (a loop over samples with
torch's autograd on an unconverted copy, float64), for loss reduction "mean" and "sum".

Tolerance (float64): the engine sums in other orders than the oracle (unique keys, index_add, ghost
norms of the head), a few ulps times < 1e3 terms, < 1e-12 relative; rtol=1e-9 keeps a wide margin
while a wrong clip factor (the abadi epsilon alone is 1e-6 relative), scale or norm fails.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _layer_oracle import DT, EBS, clipped_update, per_sample_grads, per_sample_loss, sq_norms
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import dpkernels
from dpkernels.nn import DPEmbedding

TOL = dict(rtol=1e-9, atol=1e-12)


def check_step(model, x, y, red, **kw):
    """Run one noiseless DP step on ``model`` and compare with the oracle on a copy; returns the engine."""
    ref = copy.deepcopy(model)
    grads = per_sample_grads(ref, x, y)
    norms = sq_norms(grads, list(grads)).sqrt()
    R = norms.median().item() if norms.numel() and norms.max() > 0 else 1.0  # some clipped, some not
    with torch.no_grad():
        want_out = ref(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=EBS, loss_reduction=red, **kw
    )
    out = model(x)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)  # the same forward values as torch
    loss = (out - y).square().flatten(1).sum(1)
    opt.backward(loss.mean() if red == "mean" else loss.sum())
    opt.step()  # lr = 0: only finishes parameters no sample reached (an empty batch)
    name = {id(p): n for n, p in model.named_parameters()}
    groups = [[name[id(p)] for p in ps] for ps in opt.engine.groups]
    want = clipped_update(grads, groups, opt.engine.bounds, red)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")
    return opt.engine, norms, R


class EmbNet(nn.Module):
    """Embedding (used once or twice, on different ids) -> tanh -> Linear head."""

    def __init__(self, emb: nn.Embedding, twice: bool):
        super().__init__()
        self.emb, self.twice = emb, twice
        self.head = nn.Linear(emb.embedding_dim, 3)

    def forward(self, x):
        h = self.emb(x)
        if self.twice:
            h = h + 0.5 * self.emb((3 * x + 1) % self.emb.num_embeddings)
        return self.head(torch.tanh(h))


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(0, 4),
    T=st.integers(1, 6),
    V=st.integers(1, 9),
    D=st.integers(1, 5),
    pad=st.sampled_from([None, 0, -1]),
    twice=st.booleans(),
    red=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**31 - 1),
)
@example(B=0, T=3, V=5, D=2, pad=0, twice=True, red="sum", seed=0)
@example(B=1, T=1, V=1, D=1, pad=None, twice=False, red="mean", seed=1)
@example(B=3, T=6, V=2, D=3, pad=-1, twice=True, red="mean", seed=2)
def test_step_matches_naive(B, T, V, D, pad, twice, red, seed):
    torch.manual_seed(seed)
    model = EmbNet(nn.Embedding(V, D, padding_idx=pad), twice).to(DT)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=gen)  # V small: tokens repeat within a sample
    y = torch.randn(B, T, 3, generator=gen, dtype=DT)
    check_step(model, x, y, red)


@pytest.mark.parametrize("kw", [{}, {"groups": "layer-wise"}, {"strategy": "two-pass"}])
def test_repeated_tokens_and_padding_fixed_case(kw):
    torch.manual_seed(0)
    model = EmbNet(nn.Embedding(6, 4, padding_idx=2), twice=True).to(DT)
    x = torch.tensor([[1, 1, 2, 1], [2, 2, 2, 2], [0, 3, 3, 5], [4, 2, 4, 4], [5, 0, 1, 5]])
    y = torch.randn(5, 4, 3, dtype=DT)
    eng, norms, R = check_step(model, x, y, "mean", **kw)
    assert bool((norms > R).any()) and bool((norms < R).any())  # the bound binds for some samples only
    assert "index" in eng.report()


class PosNet(nn.Module):
    """Token + position embeddings with Hugging Face's (1, T) position ids broadcast over the batch."""

    def __init__(self, V: int, T: int, D: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device)[None]  # (1, T)
        return self.head(torch.tanh(self.tok(x) + self.pos(pos)))


@pytest.mark.parametrize("red", ["mean", "sum"])
@pytest.mark.parametrize("B,T", [(1, 1), (4, 5), (3, 1)])
def test_broadcast_position_ids_are_expanded(B, T, red):
    """Each sample's position rows get that sample's gradient, not the batch sum (exact per-sample norms)."""
    torch.manual_seed(1)
    model = PosNet(7, T, 3).to(DT)
    gen = torch.Generator().manual_seed(B)
    x = torch.randint(0, 7, (B, T), generator=gen)
    y = torch.randn(B, T, 3, generator=gen, dtype=DT)
    check_step(model, x, y, red)


def test_other_batch_mismatch_is_refused():
    class Bad(PosNet):
        def forward(self, x):
            pos = torch.arange(x.shape[1])[None].expand(2, -1)  # batch 2 != 4: not a broadcast of one row
            return self.head(self.tok(x)[:2] + self.pos(pos))

    model = Bad(5, 3, 2).to(DT)
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=4.0
    )
    with pytest.raises(RuntimeError, match="batch"):
        model(torch.randint(0, 5, (4, 3))).sum().backward()


def test_noise_is_dense_over_the_table():
    """Through make_private: rows no sample touched (and the padding row) get noise of std sigma R / EBS."""
    V, D, sigma, R, ebs = 3000, 4, 1.3, 0.7, 4.0
    torch.manual_seed(0)
    model = EmbNet(nn.Embedding(V, D, padding_idx=0), twice=False).to(DT)
    model, opt = dpkernels.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=R,
        expected_batch_size=ebs,
        seed=5,
    )
    x = torch.randint(0, 6, (4, 3))
    x[0, 0] = 0
    loss = per_sample_loss(model, x, torch.zeros(4, 3, 3, dtype=DT))
    loss.mean().backward()
    opt.step()
    grad = model.emb.weight.grad
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[x.flatten()] = False
    untouched[0] = True  # the padding row has no data either: pure noise
    vals = grad[untouched].flatten()
    std = sigma * R / ebs
    # n ~ 12000 Gaussians: the sample std has relative standard error 1/sqrt(2n) ~ 0.65%; 4% is > 6 SE
    assert abs(vals.std().item() / std - 1) < 0.04
    assert abs(vals.mean().item()) < 5 * std / math.sqrt(vals.numel())  # 5 standard errors
    assert opt.engine.noise_std() == pytest.approx(std)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"scale_grad_by_freq": True}, "scale_grad_by_freq=True.*scale_grad_by_freq=False"),
        ({"sparse": True}, "sparse=True.*sparse=False"),
        # torch renormalises the looked-up rows in place in forward, outside the noise: which rows changed
        # would tell which tokens the batch held
        ({"max_norm": 1.0}, "max_norm=1.0 renormalises.*which tokens.*max_norm=None"),
    ],
    ids=["scale_grad_by_freq", "sparse", "max_norm"],
)
def test_refused_options(kw, match):
    model = nn.Sequential(nn.Embedding(5, 3, **kw), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=match):
        dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=2.0
        )


def test_flag_set_after_conversion_is_refused_in_forward():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    model, _ = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=2.0
    )
    model[0].scale_grad_by_freq = True
    with pytest.raises(ValueError, match="DPEmbedding '0'.*scale_grad_by_freq"):
        model(torch.zeros(2, 3, dtype=torch.long))
    model[0].scale_grad_by_freq = False
    with pytest.raises(ValueError, match="0-dimensional"):
        model(torch.tensor(1))


def test_forward_state_dict_and_from_module_match_torch():
    for kw in ({}, {"padding_idx": 1}):
        torch.manual_seed(0)
        layer = nn.Embedding(6, 3, **kw)
        twin = copy.deepcopy(layer)
        dp = DPEmbedding.from_module(layer)
        assert dp.weight is layer.weight and dp.padding_idx == layer.padding_idx
        assert dp.state_dict().keys() == layer.state_dict().keys()
        assert repr(dp).split("(", 1)[1] == repr(layer).split("(", 1)[1]
        ids = torch.tensor([[0, 1, 5, 5], [3, 3, 2, 1]])
        torch.testing.assert_close(dp(ids), twin(ids), rtol=0, atol=0)  # no engine: torch's forward itself
    assert dpkernels.DP_LAYERS[nn.Embedding] is DPEmbedding
    with pytest.raises(TypeError, match="takes a Embedding"):
        DPEmbedding.from_module(nn.Linear(2, 2))
