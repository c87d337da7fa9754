"""The generic certificate (backends without bounds of their own) counts every rounding a raw norm may make.

`ops.certified` certifies a backend's raw squared norm r by |r - n| <= dot_gamma(n_chain) C^2, n_chain the
longest chain of roundings the op may perform. Each test here stands in for a backend whose raw norm errs
by the most the standard model allows for a summation structure a real kernel uses (gamma_N times the
absolute sum C^2 of the terms, N that structure's chain length) and checks the certificate stays above
the exact norm:

- grouped convolutions: per-group norms summed over the groups (the compiled backend: groups - 1 more
  additions), or every group's terms in one flat sum (Triton: the (group, tile pair) partials of a sample
  summed by one torch reduction, in any order);
- a bias norm formed as sum(G G^T) (Triton's ghost kernels: a p-long Gram entry, then a T^2-term sum), not
  only as the squares of the token sums.
"""

from __future__ import annotations

import pytest
import torch

from dpkernels import ops
from dpkernels.ops.bounds import gamma

U32 = 2.0**-24
_BOUND_OPS = [
    "linear_norms_bound", "bias_norms_bound", "conv_norms_bound", "embedding_norms_bound",
    "embedding_linear_cross_bound", "affine_norms_bound",
]  # fmt: skip


@pytest.fixture(autouse=True)
def generic(monkeypatch):
    """The reference without its own bounds: its (faked) raw norms get the generic certificate."""
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    for name in _BOUND_OPS:
        monkeypatch.delattr(ops.reference, name)
    return monkeypatch


def _worst(n: torch.Tensor, abs_sum: torch.Tensor, chain: int) -> torch.Tensor:
    """A raw norm as far below the exact n as a chain of ``chain`` float32 roundings over terms of absolute
    sum abs_sum may put it (dot_gamma's model: gamma_{chain + 1})."""
    return n - gamma(chain + 1, U32) * abs_sum


@pytest.mark.parametrize("order", ["per-group", "flat"])
@pytest.mark.parametrize("method", ["ghost", "inst"])
def test_grouped_conv_chain(generic, order, method):
    B, groups, cg, L = 3, 64, 2, 2  # conv1d, kernel 1: token t of group j is x[:, j's channels, t]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, groups * cg, L, generator=gen)
    g = torch.randn(B, groups * cg, L, generator=gen)
    a = x.double().view(B, groups, cg, L).transpose(2, 3)  # (B, groups, T, d)
    gr = g.double().view(B, groups, cg, L).transpose(2, 3)
    n = torch.einsum("bjtp,bjtd->bjpd", gr, a).square().sum((1, 2, 3))
    c2 = (a.norm(dim=-1) * gr.norm(dim=-1)).sum(2).square().sum(1)  # sum_j (sum_t |a_t||g_t|)^2
    T, d, p = L, cg, cg
    per_group = T * T + d + p + 4 if method == "ghost" else T + p * d + 4
    flat = groups * T * T + d + p + 4 if method == "ghost" else T + groups * p * d + 4
    chain = per_group + groups - 1 if order == "per-group" else flat
    raw = _worst(n, c2, chain)
    generic.setitem(ops.served("reference"), "conv_norms", lambda *args, **kw: (raw, None))
    w, _ = ops.certified.conv_norms(
        x, g, kernel_size=(1,), stride=(1,), padding=(0,), dilation=(1,), groups=groups, bias=False,
        method=method, backend="reference",
    )  # fmt: skip
    assert bool((w >= n).all()), f"certified {w.tolist()} < exact {n.tolist()}"


def test_bias_as_gram_sum(generic):
    B, T, d, p = 3, 32, 4, 4
    gen = torch.Generator().manual_seed(1)
    a, g = torch.randn(B, T, d, generator=gen), torch.randn(B, T, p, generator=gen)
    g64 = g.double()
    n_b = g64.sum(1).square().sum(1)
    # sum_{t,s} |g_t . g_s| <= (sum_t |g_t|)^2: the terms of sum(G G^T), a p-long dot each, T^2 of them
    raw_b = _worst(n_b, g64.norm(dim=-1).sum(1).square(), T * T + p + 2)
    rw, _ = ops.reference.linear_norms(a, g, bias=True, method="ghost")
    generic.setitem(ops.served("reference"), "linear_norms", lambda *args, **kw: (rw, raw_b))
    _, b = ops.certified.linear_norms(a, g, bias=True, method="ghost", backend="reference")
    assert bool((b >= n_b).all()), f"certified {b.tolist()} < exact {n_b.tolist()}"
