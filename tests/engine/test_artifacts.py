"""Nothing secret leaves the engine: saved files, pickles, deep copies and state_dicts of a private
model, of its DP layers and of its optimizer hold no noise seed, clip factor, per-sample norm, batch size
or noiseless sum; the engine drops each batch's factors and norms once its pass is done. A copied or
reloaded private model computes as before but refuses to train until make_private is called on it.

Whoever holds the seed regenerates the noise and subtracts it from a released update; the clip factors
and norms are functions of single samples; the realised batch size of a Poisson batch is itself private.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import struct
import types

import pytest
import torch
from torch import Tensor

import dpkernels
import dpkernels.engine as engine_mod

from .zoo import BY_NAME, batch, batch_loss, per_sample_grads, reference_groups, reference_update, trainable

SEED = 0x1234_5678_9ABC_DEF  # 8 bytes in a pickle; any other 8 bytes matching it has probability 2^-64
B, EBS, R = 7, 5.0, 0.05  # R small: every sample clipped, so every factor is a distinct number below 1
# float64 against the float64 oracle: a few ulps of summation-order difference (see test_modes.py)
TOL = dict(rtol=1e-9, atol=1e-12)


@pytest.fixture
def secrets(monkeypatch):
    """Every clip factor and per-sample norm the engine computes, as it computed them."""
    seen: dict[str, list[Tensor]] = {"factors": [], "norms": []}
    real = engine_mod.clip_factors

    def spy(norms, *args, **kw):
        c = real(norms, *args, **kw)
        seen["norms"].append(norms.detach().clone())
        seen["factors"].append(c.detach().clone())
        return c

    monkeypatch.setattr(engine_mod, "clip_factors", spy)
    return seen


def _private(k: int = 2, **kw):
    case = BY_NAME["mlp"]
    model = case.build()
    kw = dict(dict(noise_multiplier=1.0, max_grad_norm=R, expected_batch_size=EBS, seed=SEED), **kw)
    return dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=k, **kw)


def _half_step(model, opt):
    """One logical step done, then one of its two micro-batches: the engine holds a noiseless sum."""
    case = BY_NAME["mlp"]
    for seed in (0, 1):
        x, y = batch(case, B, seed=seed)
        batch_loss(case, model(x), y, "mean").backward()
    opt.step()
    x, y = batch(case, B, seed=2)
    batch_loss(case, model(x), y, "mean").backward()
    raw = [t.detach().clone() for t in opt.engine._acc.values()]
    assert raw, "the engine should hold the first micro-batch's sums"
    return raw


def _suspects(seen: dict[str, list[Tensor]], raw: list[Tensor]) -> list[Tensor]:
    # the engine keeps factors times the loss scale (B for a mean loss) and squared norms too
    out = list(raw)
    for c in seen["factors"]:
        out += [c, c * B]
    for n in seen["norms"]:
        out += [n, n * n]
    return out


def _byte_patterns(suspects: list[Tensor]) -> list[bytes]:
    pats = [SEED.to_bytes(8, "little"), SEED.to_bytes(8, "big")]
    for t in suspects:
        t = t.double().flatten()
        pats += [struct.pack("<d", float(v)) for v in t if float(v) not in (0.0, 1.0)]
    return pats


def _reachable(*roots) -> list:
    """Every object reachable from ``roots`` (not through modules, classes or functions' globals)."""
    seen: set[int] = set()
    stack, out = list(roots), []
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        out.append(o)
        if isinstance(o, (types.ModuleType, type, types.BuiltinFunctionType)):
            continue
        if isinstance(o, types.FunctionType):
            stack.extend(c.cell_contents for c in o.__closure__ or ())
            continue
        stack.extend(gc.get_referents(o))
    return out


def _assert_clean(objs: list, suspects: list[Tensor], where: str, live: bool = False) -> None:
    """No engine, seed, batch size or suspect tensor in ``objs``; ``live``: the training run's own
    objects, whose engine holds the seed and the sizes, but no per-step tensor once a pass is done."""
    for o in objs:
        if not live:
            assert not isinstance(o, engine_mod.Engine), f"{where} holds a DP engine"
            assert not (isinstance(o, int) and o == SEED), f"{where} holds the noise seed"
        if isinstance(o, engine_mod.DetachedEngine):
            assert o.batch_size is None, f"{where} holds a batch size"
        if isinstance(o, Tensor) and o.dtype == torch.float64:
            for s in suspects:
                assert not (o.shape == s.shape and torch.equal(o.detach(), s)), f"{where} holds a per-step tensor"


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


ARTIFACTS = {
    "torch.save(model)": lambda m, o: _saved(m),
    "pickle.dumps(model)": lambda m, o: pickle.dumps(m),
    "torch.save(layer)": lambda m, o: _saved(m[0]),
    "torch.save(optimizer)": lambda m, o: _saved(o),
    "model.state_dict()": lambda m, o: _saved(m.state_dict()),
    "layer.state_dict()": lambda m, o: _saved(m[0].state_dict()),
    "optimizer.state_dict()": lambda m, o: _saved(o.state_dict()),
}


@pytest.mark.parametrize("what", list(ARTIFACTS))
def test_saved_artifacts_hold_no_secret(what, secrets):
    model, opt = _private()
    raw = _half_step(model, opt)
    data = ARTIFACTS[what](model, opt)
    for pat in _byte_patterns(_suspects(secrets, raw)):
        assert pat not in data, f"{what} holds a secret value ({pat.hex()})"
    if what.startswith("torch.save(") or what.startswith("pickle"):
        loaded = torch.load(io.BytesIO(data), weights_only=False) if what.startswith("torch") else pickle.loads(data)
        _assert_clean(_reachable(loaded), _suspects(secrets, raw), what)


@pytest.mark.parametrize("what", ["model", "optimizer", "layer"])
def test_deep_copies_hold_no_secret(what, secrets):
    model, opt = _private()
    raw = _half_step(model, opt)
    obj = {"model": model, "optimizer": opt, "layer": model[0]}[what]
    _assert_clean(_reachable(copy.deepcopy(obj)), _suspects(secrets, raw), f"deepcopy({what})")


def test_per_step_tensors_are_released_after_each_pass(secrets):
    """After a micro-batch's pass and after the step, no tensor reachable from the model or the optimizer
    holds a clip factor or a norm (the noiseless sums of an unfinished step stay, until the step)."""
    model, opt = _private()
    _half_step(model, opt)
    gc.collect()
    _assert_clean(_reachable(model, opt), _suspects(secrets, []), "the live engine after a pass", live=True)
    opt.step()
    gc.collect()
    assert not opt.engine._acc
    _assert_clean(_reachable(model, opt), _suspects(secrets, []), "the live engine after the step", live=True)
    assert all(c is None for c in opt.engine._factors)


def _oracle_step(x, y):
    case = BY_NAME["mlp"]
    plain = case.build()
    gr = reference_groups(plain, "all-layer")
    return reference_update(per_sample_grads(plain, case, x, y), gr, [R], "abadi", EBS)


COPIES = {
    "deepcopy": copy.deepcopy,
    "torch.load": lambda m: torch.load(io.BytesIO(_saved(m)), weights_only=False),
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
}


@pytest.mark.parametrize("how", list(COPIES))
def test_copied_private_model_asks_for_make_private_then_trains(how):
    case = BY_NAME["mlp"]
    x, y = batch(case, B, seed=5)
    model, opt = _private(k=1, noise_multiplier=0.0)
    batch_loss(case, model(x), y, "mean").backward()
    opt.step()
    twin = COPIES[how](model)
    # inference and an input-gradient probe work as before
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    xv = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(batch_loss(case, twin(xv), y, "mean"), xv)
    xo = x.clone().requires_grad_(True)
    (go,) = torch.autograd.grad(batch_loss(case, model(xo), y, "mean"), xo)
    torch.testing.assert_close(gx, go, rtol=0, atol=0)
    # training it is refused, naming the fix; nothing is written
    with pytest.raises(RuntimeError, match=r"DP layer DPLinear was copied, pickled or loaded .*make_private"):
        batch_loss(case, twin(x), y, "mean").backward()
    assert all(p.grad is None for p in twin.parameters())
    # through make_private it trains: the noiseless step is the oracle's (from its current weights)
    plain = case.build()
    plain.load_state_dict(twin.state_dict())
    gr = reference_groups(plain, "all-layer")
    want = reference_update(per_sample_grads(plain, case, x, y), gr, [R], "abadi", EBS)
    with pytest.warns(UserWarning, match="copy of a private model"):  # its account starts at 0
        twin, topt = dpkernels.make_private(
            twin, torch.optim.SGD(twin.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=R,
            expected_batch_size=EBS,
        )  # fmt: skip
    batch_loss(case, twin(x), y, "mean").backward()
    topt.step()
    for n, p in trainable(twin).items():
        torch.testing.assert_close(p.grad, want[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")
    # and the original was not disturbed by its copy
    opt.zero_grad()
    plain.load_state_dict(model.state_dict())
    want = reference_update(per_sample_grads(plain, case, x, y), gr, [R], "abadi", EBS)
    batch_loss(case, model(x), y, "mean").backward()
    opt.step()
    for n, p in trainable(model).items():
        torch.testing.assert_close(p.grad, want[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("how", list(COPIES))
def test_copied_dp_optimizer_refuses_to_step(how):
    model, opt = _private(k=1)
    clone = COPIES[how](opt)
    with pytest.raises(RuntimeError, match=r"this DP optimizer was copied, pickled or loaded .*make_private"):
        clone.step()
    assert math.isfinite(opt.engine.noise_std())  # the original keeps its engine
