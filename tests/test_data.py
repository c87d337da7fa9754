"""Poisson batches: each example in each batch independently with probability q; empty batches are
valid (zero-size) batches; the loader drives a DP step.

Statistical checks are two-sided at level ALPHA = 1e-6 under the Poisson model; the generators are
seeded, so the tests are deterministic and the level bounds the chance a correct sampler fails.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import dpkernels
from dpkernels.data import PoissonBatchSampler, poisson_loader

ALPHA = 1e-6


def _batches(n: int, q: float, steps: int, seed: int = 0) -> list[list[int]]:
    return list(PoissonBatchSampler(n, q, steps=steps, generator=torch.Generator().manual_seed(seed)))


def test_each_index_is_included_with_probability_q():
    n, q, steps = 50, 0.1, 2000
    counts = np.zeros(n)
    for b in _batches(n, q, steps):
        assert len(set(b)) == len(b) and all(0 <= i < n for i in b)  # a subset, no repeats
        counts[b] += 1
    # each count ~ Binomial(steps, q); all n inside their two-sided ALPHA / n quantiles (Bonferroni)
    lo, hi = stats.binom.ppf(ALPHA / (2 * n), steps, q), stats.binom.isf(ALPHA / (2 * n), steps, q)
    assert lo <= counts.min() and counts.max() <= hi, (counts.min(), counts.max(), lo, hi)
    # the total ~ Binomial(n steps, q): q pinned to about +-3% relative
    tot = counts.sum()
    assert stats.binom.ppf(ALPHA / 2, n * steps, q) <= tot <= stats.binom.isf(ALPHA / 2, n * steps, q)
    # a chi-square test of uniformity across indices (a sampler favouring some examples fails)
    chi2 = ((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum()
    assert chi2 <= stats.chi2.isf(ALPHA, n), chi2


def test_batch_sizes_vary_as_binomial_and_indices_independently():
    n, q, steps = 40, 0.25, 2000
    batches = _batches(n, q, steps, seed=1)
    sizes = np.array([len(b) for b in batches], dtype=float)
    # variance of Binomial(n, q) sizes: (steps - 1) s^2 / (n q (1 - q)) ~ chi2(steps - 1) approximately
    # (sizes are near-normal at n q = 10); a fixed-size or shuffled sampler has variance ~0
    v = sizes.var(ddof=1) / (n * q * (1 - q))
    df = steps - 1
    assert stats.chi2.ppf(ALPHA / 2, df) / df <= v <= stats.chi2.isf(ALPHA / 2, df) / df, v
    # pairwise independence of two indices: P(both) = q^2, count ~ Binomial(steps, q^2)
    both = sum(1 for b in batches if 0 in b and 1 in b)
    assert stats.binom.ppf(ALPHA / 2, steps, q * q) <= both <= stats.binom.isf(ALPHA / 2, steps, q * q)


def test_steps_default_to_one_expected_epoch_and_are_reproducible():
    assert len(PoissonBatchSampler(100, 0.1)) == 10
    assert len(PoissonBatchSampler(100, 0.3)) == 3  # round(1 / 0.3)
    assert len(PoissonBatchSampler(100, 1.0)) == 1
    assert len(PoissonBatchSampler(100, 0.01, steps=7)) == 7
    assert len(list(PoissonBatchSampler(100, 0.1))) == 10
    assert _batches(30, 0.2, 5, seed=3) == _batches(30, 0.2, 5, seed=3)
    assert _batches(30, 0.2, 5, seed=3) != _batches(30, 0.2, 5, seed=4)
    assert _batches(5, 1.0, 2) == [[0, 1, 2, 3, 4]] * 2  # q = 1: everything, every step
    assert PoissonBatchSampler(200, 0.05).expected_batch_size == pytest.approx(10.0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_samples=-1, sample_rate=0.1), "num_samples"),
        (dict(num_samples=10, sample_rate=0.0), "sample_rate"),
        (dict(num_samples=10, sample_rate=1.5), "sample_rate"),
        (dict(num_samples=10, sample_rate=0.1, steps=0), "steps"),
    ],
)
def test_bad_sampler_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        PoissonBatchSampler(**kw)


class _Dicts(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"x": torch.full((2, 3), float(i), dtype=torch.float16), "label": i, "w": 0.5, "mask": np.ones(3, bool)}


def test_empty_batches_collate_to_zero_size_tensors():
    ds = TensorDataset(torch.randn(6, 3, 5, dtype=torch.float64), torch.arange(6))
    # q tiny: every batch is empty (probability of any inclusion ~ 6e-12)
    batches = list(poisson_loader(ds, 1e-12, steps=3))
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == (0, 3, 5) and x.dtype == torch.float64
        assert y.shape == (0,) and y.dtype == torch.int64
    (b,) = list(poisson_loader(_Dicts(), 1e-12, steps=1))
    assert b["x"].shape == (0, 2, 3) and b["x"].dtype == torch.float16
    assert b["label"].shape == (0,) and b["label"].dtype == torch.int64
    assert b["w"].shape == (0,) and b["w"].dtype == torch.float64
    assert b["mask"].shape == (0, 3) and b["mask"].dtype == torch.bool
    # a non-empty batch goes through the usual collate
    (b,) = list(poisson_loader(_Dicts(), 1.0, steps=1))
    assert b["x"].shape == (4, 2, 3) and b["label"].tolist() == [0, 1, 2, 3]


def test_user_collate_fn_is_used_for_empty_batches_too():
    ds = TensorDataset(torch.randn(4, 2))
    collate = lambda items: torch.stack([t[0] for t in items]) * 2  # noqa: E731
    (b,) = list(poisson_loader(ds, 1e-12, steps=1, collate_fn=collate))
    assert isinstance(b, torch.Tensor) and b.shape == (0, 2)
    (b,) = list(poisson_loader(ds, 1.0, steps=1, collate_fn=collate))
    torch.testing.assert_close(b, ds.tensors[0] * 2, rtol=0, atol=0)  # exact: a product by 2


class _Record:
    """A custom per-sample type: nothing can empty it."""

    def __init__(self, text: str):
        self.text = text


_Pair = collections.namedtuple("_Pair", "tokens words")


class _Texts(Dataset):
    """Samples with every kind of field a dataset returns; each sample's text is unique."""

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {
            "x": torch.full((2,), float(i + 7)),
            "text": f"secret-{i}",
            "pair": _Pair(torch.tensor([i, i]), [f"w{i}a", f"w{i}b"]),
            "meta": (f"src-{i}", {"lang": f"lang-{i}"}),
        }


def _leaves(batch, out):
    """Every leaf of a collated batch (strings, numbers, tensors, arrays), into ``out``."""
    if isinstance(batch, dict):
        for v in batch.values():
            _leaves(v, out)
    elif isinstance(batch, list | tuple):
        for v in batch:
            _leaves(v, out)
    else:
        out.append(batch)
    return out


def test_empty_batches_hold_no_field_of_any_sample():
    """The empty batch keeps the structure (keys, namedtuple fields, trailing shapes) but holds no value of
    dataset[0]: no string, no number, no tensor element, and no tensor that views dataset[0]'s storage."""
    (b,) = list(poisson_loader(_Texts(), 1e-12, steps=1))
    assert set(b) == {"x", "text", "pair", "meta"}
    assert isinstance(b["pair"], _Pair)
    assert b["x"].shape == (0, 2) and b["pair"].tokens.shape == (0, 2) and b["text"] == []
    leaves = _leaves(b, [])
    assert all(isinstance(v, torch.Tensor) and v.untyped_storage().nbytes() == 0 for v in leaves), leaves
    # a non-empty batch is default_collate's
    (b,) = list(poisson_loader(_Texts(), 1.0, steps=1))
    assert b["text"] == ["secret-0", "secret-1", "secret-2"] and b["meta"][1]["lang"] == ["lang-0", "lang-1", "lang-2"]


def test_empty_batch_of_a_sequence_first_collate_empties_the_batch_dimension():
    ds = TensorDataset(torch.randn(4, 5, 3))
    collate = lambda items: torch.stack([t[0] for t in items], dim=1)  # noqa: E731  (T, B, d)
    (b,) = list(poisson_loader(ds, 1e-12, steps=1, collate_fn=collate))
    assert b.shape == (5, 0, 3)


@pytest.mark.parametrize(
    "collate,match",
    [
        (lambda items: {"x": torch.stack([t[0] for t in items]), "name": "first"}, r"batch\['name'\] \(str\)"),
        (lambda items: _Record("a"), r"batch \(_Record\)"),
        (lambda items: (torch.stack([t[0] for t in items]), _Record("a")), r"batch\[1\] \(_Record\)"),
        (lambda items: torch.stack([t[0] for t in items]).sum(0), r"batch \(Tensor\).*no batch dimension"),
    ],
    ids=["bare-string", "custom-batch-type", "custom-type-field", "tensor-without-batch-dimension"],
)
def test_a_batch_that_cannot_be_emptied_is_refused_when_the_loader_is_made(collate, match):
    ds = TensorDataset(torch.randn(4, 2))
    with pytest.raises(TypeError, match=match + ".*dataset\\[0\\].*collate_fn"):
        poisson_loader(ds, 0.5, steps=1, collate_fn=collate)


@pytest.mark.parametrize("kw", [dict(batch_size=4), dict(shuffle=True), dict(drop_last=True), dict(sampler=[0])])
def test_loader_refuses_its_own_batching_arguments(kw):
    with pytest.raises(TypeError, match="Poisson"):
        poisson_loader(TensorDataset(torch.zeros(3)), 0.5, **kw)


def test_loader_refuses_an_empty_dataset():
    with pytest.raises(ValueError, match="non-empty"):
        poisson_loader(TensorDataset(torch.zeros(0, 2)), 0.5)


def _train(q: float, steps: int):
    torch.manual_seed(0)
    n = 40
    ds = TensorDataset(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,)))
    loader = poisson_loader(ds, q, steps=steps, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    before = [p.detach().clone() for p in model.parameters()]
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
        sample_rate=q, dataset_size=n, seed=0, loss_reduction="sum",
    )  # fmt: skip
    sizes = []
    for x, y in loader:
        sizes.append(len(x))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
    return model, opt, before, sizes


@pytest.mark.parametrize("q,empty", [(0.25, False), (1e-12, True)], ids=["batch", "empty-batch"])
def test_loader_trains_dp_steps(q, empty):
    model, opt, before, sizes = _train(q, steps=2)
    assert len(sizes) == 2 and (all(s == 0 for s in sizes) if empty else all(s > 0 for s in sizes))
    assert opt.accountant.steps == 2 and opt.accountant.history[0][1] == pytest.approx(q)
    assert opt.engine.expected_batch_size == pytest.approx(q * 40)
    for p, p0 in zip(model.parameters(), before):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert not torch.equal(p.detach(), p0)  # an empty batch still moves the parameters: by noise
    if empty:
        # noise only: sigma R / 1 per coordinate (sum reduction); 77 values: the std within ~[0.45, 1.55]x
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        s = float(g.square().sum())
        assert stats.chi2.ppf(ALPHA / 2, g.numel()) <= s <= stats.chi2.isf(ALPHA / 2, g.numel())
        assert math.isfinite(s)


def test_default_draws_ignore_torch_manual_seed():
    """Without a generator the batches come from the operating system's entropy: torch.manual_seed (which
    a training script may set for reproducibility) must not make them predictable."""
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append(list(PoissonBatchSampler(1000, 0.5, steps=2)))
    assert draws[0] != draws[1]  # equal with probability 2**-2000 for independent draws
    seeded = [list(PoissonBatchSampler(1000, 0.5, steps=2, generator=torch.Generator().manual_seed(3))) for _ in "ab"]
    assert seeded[0] == seeded[1]


def test_pad_to_pads_each_batch_to_its_bucket_with_zero_rows_and_a_mask():
    ds = TensorDataset(torch.randn(40, 3), torch.arange(40))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for (x, y), mask in poisson_loader(ds, 0.25, steps=30, generator=g, pad_to=8):
        n = int(mask.sum())
        size = max(8, -(-n // 8) * 8)  # the bucket: the next multiple of 8 (a larger batch is never split)
        assert x.shape == (size, 3) and y.shape == (size,) and mask.shape == (size,) and mask.dtype == torch.bool
        assert mask[:n].all() and not mask[n:].any()  # the drawn samples first, then the padding
        assert (x[n:] == 0).all() and (y[n:] == 0).all()
        assert torch.equal(x[:n], ds.tensors[0][y[:n]])  # the real rows are the drawn samples
        seen.add(size)
    assert {8, 16} <= seen  # batches of 10 +- 2.7 samples: both buckets occur (seeded; 24 too, for 19 samples)
    # an empty batch is all padding; dict batches keep their keys
    ((b, mask),) = list(poisson_loader(_Dicts(), 1e-12, steps=1, pad_to=5))
    assert b["x"].shape == (5, 2, 3) and b["x"].dtype == torch.float16 and not mask.any()
    assert b["mask"].shape == (5, 3) and b["label"].shape == (5,)


def test_pad_to_refuses_what_it_cannot_pad():
    ds = TensorDataset(torch.randn(4, 2))
    with pytest.raises(ValueError, match="pad_to must be a positive int"):
        poisson_loader(ds, 0.5, pad_to=0)
    words = [("a", 1), ("b", 2)]
    with pytest.raises(TypeError, match=r"cannot pad batch\[0\].*one entry per sample"):
        poisson_loader(words, 0.5, pad_to=4)


def test_a_padded_loader_drives_a_private_step():
    """Loader -> model -> optimizer.backward(loss, sample_mask=mask): every step has the bucket's shape."""
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(32, 5), torch.randn(32, 2))
    model = nn.Linear(5, 2)
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, expected_batch_size=8.0, seed=0
    )
    for (x, y), mask in poisson_loader(ds, 0.25, steps=3, generator=torch.Generator().manual_seed(1), pad_to=16):
        assert x.shape[0] == 16
        opt.zero_grad()
        opt.backward((model(x) - y).square().sum(1).mean(), sample_mask=mask)
        opt.step()
        assert torch.isfinite(model.weight).all()
