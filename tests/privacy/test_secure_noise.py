"""make_private(secure_mode=True): the step is the default mode's up to the noise (noise_multiplier 0 gives
the same gradients, through fused sums, accumulation, shared and untouched parameters), every (step,
parameter) draws its own stream, the key never reaches a saved file or a copy, and a seed is refused.
The noise's scale per parameter kind is tested with the default mode's KS tests (test_noise_ks.py,
secure ids); the ops and their ChaCha20 on every backend in tests/ops/test_secure_noise_ops.py.
"""

from __future__ import annotations

import copy
import io
import pickle
import struct

import pytest
import torch
from torch import nn

import dpkernels
from dpkernels.engine import attached_engine
from dpkernels.secure import SecureNoise


class _Net(nn.Module):
    """Two same-shaped Linears (their streams must differ), a tied pair of uses, and an unused Linear
    (its gradient is noise alone, given at the step)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.unused = nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(self.a(x))))


def _run(secure: bool, sigma: float, steps: int = 2, accumulation: int = 1, backend: str | None = None):
    torch.manual_seed(0)
    model = _Net()
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=sigma, max_grad_norm=0.5,
        expected_batch_size=4.0, accumulation_steps=accumulation, seed=None if secure else 7, secure_mode=secure,
        backend=backend,
    )  # fmt: skip
    grads = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulation):
            model(torch.randn(4, 6, generator=gen)).pow(2).sum().backward()
        opt.step()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return model, opt, grads


@pytest.mark.parametrize("accumulation", [1, 2])
def test_without_noise_secure_mode_steps_as_the_default_mode(accumulation):
    _, _, plain = _run(False, 0.0, accumulation=accumulation)
    _, _, secure = _run(True, 0.0, accumulation=accumulation)
    for g0, g1 in zip(plain, secure):
        for n in g0:
            # default: scale * (prev + sum) in float32 (two roundings); secure: the float32 sum scaled in float64
            # and rounded once: they differ by at most 2 ulp of float32 (2 * 2^-24 relative)
            torch.testing.assert_close(g1[n], g0[n], rtol=2**-22, atol=1e-30, msg=n)
        assert torch.equal(g1["unused.weight"], torch.zeros(2, 3))


def test_streams_differ_per_step_parameter_and_run():
    _, _, g1 = _run(True, 1.0)
    _, _, g2 = _run(True, 1.0)
    _, _, g0 = _run(True, 0.0)
    noise = [{n: g[n] - z[n] for n in g} for g, z in zip(g1, g0)]
    # the two same-shaped Linears, and each across steps and across runs (fresh OS keys)
    assert not torch.allclose(noise[0]["a.weight"], noise[0]["b.weight"])
    assert not torch.allclose(noise[0]["a.weight"], noise[1]["a.weight"])
    assert not torch.allclose(noise[0]["unused.weight"], noise[1]["unused.weight"])
    assert not torch.allclose(g1[0]["a.weight"], g2[0]["a.weight"])
    # the noise has the scale sigma R / E (loose here: 36 values; the KS tests check the distribution)
    std = 1.0 * 0.5 / 4.0
    assert 0.5 * std < noise[0]["a.weight"].std() < 1.5 * std


def test_triton_backend_serves_the_secure_noise():
    """The engine's noise goes through the dispatcher: the forced backend draws it (one small parameter: the
    CPU interpreter is slow)."""
    model = nn.Linear(3, 2, bias=False)
    model, opt = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, expected_batch_size=2.0,
        secure_mode=True, backend="triton",
    )  # fmt: skip
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert dpkernels.ops.last_backend["secure_noise"] == "triton" and model.weight.grad.abs().sum() > 0


def test_seed_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="secure_mode draws the noise key from the operating system"):
        dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, expected_batch_size=4.0,
            seed=3, secure_mode=True,
        )  # fmt: skip


def test_key_never_saved_or_copied():
    model, opt, _ = _run(True, 1.0, steps=1)
    secure = attached_engine(model).secure
    key = struct.pack("<8I", *secure._key)
    blobs = [pickle.dumps(model), pickle.dumps(opt), pickle.dumps(copy.deepcopy(model))]
    for obj in (model.state_dict(), opt.state_dict(), model, opt):
        buf = io.BytesIO()
        torch.save(obj, buf)
        blobs.append(buf.getvalue())
    for blob in blobs:  # neither the key nor any 8-byte part of it, in any byte order
        for part in [key[i : i + 8] for i in range(0, 32, 8)] + [struct.pack(">8I", *secure._key)[:8]]:
            assert part not in blob
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(secure)
    with pytest.raises(TypeError, match="never pickled"):
        copy.deepcopy(secure)
    assert all(str(w) not in repr(secure) and f"{w:x}" not in repr(secure) for w in secure._key)


def test_nonce_fields_must_fit_32_bits():
    with pytest.raises(ValueError, match="step 4294967296 does not fit"):
        SecureNoise.nonce(2**32, 0, 0)
    assert SecureNoise.nonce(2**32 - 1, 5, 1) == [2**32 - 1, 5, 1]


def test_bench_quick_runs(tmp_path):
    """bench/secure_noise.py --quick (the op and step comparison at tiny sizes) runs and writes its report."""
    from bench.secure_noise import main

    assert main(["--quick", "--no-compiled", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "secure_noise.md").read_text()
    assert "| reference |" in md and "gpt2-tiny" in md
