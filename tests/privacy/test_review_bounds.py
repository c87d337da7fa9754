"""Adversarial review of the certified norms (dpkernels.ops.certified): each test builds stored tensors whose
exact per-sample squared norm is known in closed form (powers of two: exact in float64) and checks that the
certified norm is not below it. No tolerance: a certified norm is an upper bound or it is wrong."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from dpkernels.ops import certified as C

# Flush-to-zero / denormals-are-zero (torch.set_flush_denormal(True)) changes the arithmetic of every thread
# that inherits it, OpenMP workers included, and a later set_flush_denormal(False) does not undo it on
# them: each case runs in a fresh interpreter so that the rest of the session keeps IEEE arithmetic.
_FTZ = textwrap.dedent(
    """
    import torch
    from dpkernels.ops import certified as C
    T, d = 256, 8
    a, g = torch.zeros(1, T, d), torch.zeros(1, T, d)
    a[0, 0, 0] = 2.0**-20  # sample norm in the ghost bound's unscaled range
    a[0, 1:, 0], g[0, 1:, 0] = 2.0**-64, 2.0**58  # a_t a_s products 2^-128: subnormal, flushed
    a1, g1 = torch.full((1, 1, 64), 2.0**-127), torch.full((1, 1, 64), 2.0**120)  # a1 subnormal: read as 0
    cases = {{
        "ghost": (lambda: C.linear_norms(a, g, bias=False, method="ghost")[0], ((T - 1) * 2.0**-6) ** 2),
        "one_token": (lambda: C.linear_norms(a1, g1, bias=False, method="ghost")[0], (64 * 2.0**-7) ** 2),
    }}
    fn, exact = cases[{case!r}]
    assert fn().item() >= exact  # IEEE arithmetic: certified
    torch.set_flush_denormal(True)
    try:
        print(fn().item() / exact)
    except RuntimeError as err:
        assert "flush-to-zero" in str(err) and "set_flush_denormal(False)" in str(err), err
        print("refused")
    """
)


@pytest.mark.parametrize("case", ["ghost", "one_token"])
def test_flush_denormal(case):
    out = subprocess.run(
        [sys.executable, "-c", _FTZ.format(case=case)], capture_output=True, text=True, check=True, timeout=300
    )
    # flushing made the certified norm 0.502x (ghost) and 0x (one token) of the exact one: now refused
    assert out.stdout.split()[-1] == "refused", out.stdout


_FTZ_STEP = textwrap.dedent(
    """
    import torch, dpkernels
    from torch import nn
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    x = torch.randn(4, 8)
    model(x).square().sum().backward()  # IEEE arithmetic: trains
    opt.step()
    opt.zero_grad()
    torch.set_flush_denormal(True)
    try:
        model(x).square().sum().backward()
    except RuntimeError as err:
        assert "flush-to-zero" in str(err), err
        assert all(p.grad is None for p in model.parameters())  # refused before any gradient
        print("refused")
    """
)


def test_flush_denormal_refused_in_a_dp_step():
    out = subprocess.run([sys.executable, "-c", _FTZ_STEP], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split()[-1] == "refused", out.stdout


_FTZ_WORKERS = textwrap.dedent(
    """
    import torch, dpkernels
    from torch import nn
    from dpkernels.ops.bounds import workers_flush
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    (torch.ones(1 << 20) * 2.0).sum()  # starts torch's worker threads, which inherit flush-to-zero
    torch.set_flush_denormal(False)  # this thread only
    print("workers", bool(workers_flush(2)))
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    try:
        model(torch.randn(4, 8)).square().sum().backward()
        print("trained")
    except RuntimeError as err:
        assert "flush-to-zero" in str(err), err
        assert all(p.grad is None for p in model.parameters())  # refused with the pass's host read, no gradient
        print("refused")
    """
)


def test_flush_denormal_left_on_torchs_worker_threads_is_refused():
    """Workers started while flush-to-zero was on keep it after set_flush_denormal(False) on the main thread
    (measured here: half of a parallel product flushed): the main thread's probe passes, the workers' does not."""
    out = subprocess.run([sys.executable, "-c", _FTZ_WORKERS], capture_output=True, text=True, check=True, timeout=300)
    lines = out.stdout.split("\n")
    workers = lines[0].split()[-1] == "True"
    assert out.stdout.split()[-1] == ("refused" if workers else "trained"), out.stdout


@pytest.mark.parametrize("method", ["ghost", "inst"])
@pytest.mark.parametrize("ea", [-75, -76, -80])
@pytest.mark.parametrize("a0", [2.0**-20, 2.0**-22])  # the sample's norm in / below the unscaled range
def test_tiny_tokens_under_huge_gradients(method, ea, a0):
    """Tokens whose Gram products underflow (a_t a_s = 2^(2 ea) <= 2^-150: rounded to 0 or the smallest
    subnormal) under output gradients near the unscaled range's top (2^59): the whole gradient comes from
    them, so only the absolute underflow constant (c, e) holds the bound up; one large token keeps the
    sample's norm in (2^-20) or just below (2^-22) the ghost bound's unscaled range."""
    T, d = 256, 8
    a, g = torch.zeros(1, T, d), torch.zeros(1, T, d)
    a[0, 0, 0] = a0
    a[0, 1:, 0], g[0, 1:, 0] = 2.0**ea, 2.0**59
    exact = ((T - 1) * 2.0 ** (ea + 59)) ** 2  # one nonzero entry, (T - 1) 2^(ea + 59): exact in float64
    got = C.linear_norms(a, g, bias=False, method=method)[0].item()
    assert got >= exact, got / exact
