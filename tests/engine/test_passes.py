"""Which backward passes are training passes.

A pass counts (per-sample norms, clipping, sums into the step) only when it will accumulate the DP
parameters' gradients: ``loss.backward()``, ``backward(inputs=[...])`` naming them, the engine's own
norms pass. ``torch.autograd.grad(loss, x)`` (FGSM, saliency maps, input-gradient probes) and
``backward(inputs=[x])`` return exact gradients of what was asked and leave the DP step untouched.
A second counting pass over the same forward (``l1.backward(retain_graph=True); l2.backward()``)
would clip each sample twice and count its forward as two micro-batches: it is refused.
"""

from __future__ import annotations

import math

import pytest
import torch

import dpkernels

from .zoo import BY_NAME, Case, batch, batch_loss, per_sample_grads, reference_groups, reference_update, trainable

EBS = 5.0
R = 0.5  # small enough that some samples of every case are clipped
# float64; the engine's norms and sums take other summation orders than the oracle (Gram products,
# micro-batch partial sums): a few ulps times the number of terms, far below 1e-9 relative. A probe
# counted into the step moves it by O(R / EBS), 1e8 times more.
TOL = dict(rtol=1e-9, atol=1e-12)


def _make(case: Case, **kw):
    model = case.build()
    kw = dict(dict(noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=EBS), **kw)
    return dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), **kw)


def _expected(case: Case, x, y, groups="all-layer"):
    model = case.build()
    gr = reference_groups(model, groups)
    ps = per_sample_grads(model, case, x, y)
    return reference_update(ps, gr, [R / math.sqrt(len(gr))] * len(gr), "abadi", EBS)


def _input_grad(case: Case, x, y):
    """d(mean loss)/dx of the plain torch model: the exact answer a probe must get."""
    x = x.detach().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(batch_loss(case, case.build()(x), y, "mean"), x)
    return gx


def _backward(opt, loss, strategy):
    if strategy == "two-pass":
        opt.backward(loss)
    else:
        loss.backward()


def _probe_grad(case, model, xv, yv):
    xv = xv.detach().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(batch_loss(case, model(xv), yv, "mean"), xv)
    return gx


def _probe_backward_inputs(case, model, xv, yv):
    xv = xv.detach().clone().requires_grad_(True)
    batch_loss(case, model(xv), yv, "mean").backward(inputs=[xv])
    assert xv.grad is not None
    return xv.grad


PROBES = {"autograd.grad": _probe_grad, "backward(inputs=[x])": _probe_backward_inputs}


@pytest.mark.parametrize("probe", list(PROBES))
@pytest.mark.parametrize(
    "name,groups,strategy",
    [
        ("mlp", "all-layer", "bk"),
        ("mlp", "layer-wise", "bk"),
        ("mlp", "all-layer", "two-pass"),
        ("conv2d", "all-layer", "bk"),
        ("layernorm", "param-wise", "two-pass"),
    ],
)
def test_input_gradient_probe_is_exact_and_not_a_training_pass(name, groups, strategy, probe):
    """A probe on a validation batch, before, between the forward and backward of, and after a training
    micro-batch: each returns the plain model's input gradient, no .grad appears, and the step equals
    the oracle's for the training batch alone."""
    case = BY_NAME[name]
    x, y = batch(case, 7, seed=0)
    xv, yv = batch(case, 6, seed=1)  # another batch size: a probe counted as a micro-batch would mismatch
    model, opt = _make(case, groups=groups, strategy=strategy)
    want = _input_grad(case, xv, yv)
    torch.testing.assert_close(PROBES[probe](case, model, xv, yv), want, **TOL)
    assert all(p.grad is None for p in model.parameters()), "a probe wrote a parameter gradient"
    loss = batch_loss(case, model(x), y, "mean")
    torch.testing.assert_close(PROBES[probe](case, model, xv, yv), want, **TOL)
    _backward(opt, loss, strategy)
    torch.testing.assert_close(PROBES[probe](case, model, xv, yv), want, **TOL)
    opt.step()
    expected = _expected(case, x, y, groups)
    for n, p in trainable(model).items():
        torch.testing.assert_close(p.grad, expected[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


def test_probe_with_accumulation_counts_no_micro_batch():
    """With accumulation_steps=2 a probe between the two micro-batches is not a third one."""
    case = BY_NAME["mlp"]
    x, y = batch(case, 7, seed=0)
    xv, yv = batch(case, 3, seed=1)
    model, opt = _make(case, accumulation_steps=2)
    batch_loss(case, model(x[:4]), y[:4], "mean").backward()
    _probe_grad(case, model, xv, yv)
    batch_loss(case, model(x[4:]), y[4:], "mean").backward()
    opt.step()
    expected = _expected(case, x, y)
    for n, p in trainable(model).items():
        torch.testing.assert_close(p.grad, expected[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


def test_probe_through_a_tied_embedding_head():
    """autograd.grad with respect to a hidden activation of a model whose embedding and head share a
    parameter: the gradient is exact and nothing is counted."""
    case = BY_NAME["tied"]
    x, y = batch(case, 5)
    model, opt = _make(case)
    plain = case.build()
    hv = plain.emb(x).detach().requires_grad_(True)
    (want,) = torch.autograd.grad(batch_loss(case, plain.head(torch.tanh(plain.mix(hv))), y, "mean"), hv)
    h = model.emb(x).detach().requires_grad_(True)
    (got,) = torch.autograd.grad(batch_loss(case, model.head(torch.tanh(model.mix(h))), y, "mean"), h)
    torch.testing.assert_close(got, want, **TOL)
    assert all(p.grad is None for p in model.parameters())
    opt.zero_grad()
    batch_loss(case, model(x), y, "mean").backward()
    opt.step()
    expected = _expected(case, x, y)
    for n, p in trainable(model).items():
        torch.testing.assert_close(p.grad, expected[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("k", [1, 2])
def test_second_backward_over_one_forward_is_refused(k):
    """l1.backward(retain_graph=True); l2.backward() over one forward: refused at the second pass, which
    changes nothing; the first pass's micro-batch is counted once and a later step is exact."""
    case = BY_NAME["mlp"]
    x, y = batch(case, 7)
    model, opt = _make(case, accumulation_steps=k)
    per = case.loss(model(x), y)
    l1, l2 = per[:4].sum() / 7, per[4:].sum() / 7
    l1.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"second backward pass over one forward.*\(l1 \+ l2\)\.backward\(\)"):
        l2.backward()
    # the step holds the first pass's clipped sums (the samples of l1, each once): what a model that
    # only ran l1.backward() steps with, bit for bit
    opt.step()
    got = {n: p.grad.clone() for n, p in trainable(model).items()}
    model2, opt2 = _make(case, accumulation_steps=k)
    per2 = case.loss(model2(x), y)
    (per2[:4].sum() / 7).backward()
    opt2.step()
    for n, p in trainable(model2).items():
        torch.testing.assert_close(got[n], p.grad, rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
    opt.zero_grad()
    for _ in range(k):
        batch_loss(case, model(x), y, "mean").backward()
    opt.step()
    expected = _expected(case, x, y)
    for n, p in trainable(model).items():
        torch.testing.assert_close(p.grad / k, expected[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", ["mlp", "tied", "conv2d"])
@pytest.mark.parametrize("with_input", [False, True], ids=["params", "params-and-input"])
def test_autograd_grad_of_dp_parameters_is_refused_and_counts_nothing(name, with_input):
    """torch.autograd.grad(loss, params): a DP layer returns no parameter gradient to autograd, so the answer
    would be None while the batch was counted as a micro-batch. Refused naming the parameters; the next
    training step is the oracle's (nothing of the refused pass is carried)."""
    case = BY_NAME[name]
    x, y = batch(case, 7, seed=0)
    model, opt = _make(case)
    params = list(trainable(model).values())
    inputs = params + ([x.clone().requires_grad_(True)] if with_input and x.is_floating_point() else [])
    xi = inputs[-1] if len(inputs) > len(params) else x
    with pytest.raises(RuntimeError, match=r"autograd\.grad was asked for the gradient of DP param.*loss\.backward"):
        torch.autograd.grad(batch_loss(case, model(xi), y, "mean"), inputs, allow_unused=True)
    assert opt.engine._micro == 0 and all(p.grad is None for p in model.parameters())
    batch_loss(case, model(x), y, "mean").backward()
    opt.step()
    expected = _expected(case, x, y)
    for n, p in trainable(model).items():
        torch.testing.assert_close(p.grad, expected[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", ["mlp", "conv2d", "layernorm", "groupnorm"])
def test_gradient_penalty_through_dp_layers_is_refused_by_name(name):
    """create_graph=True then a backward through that gradient (a WGAN-GP-style penalty): refused with the DP
    layer's name and what to do, not torch's bare once_differentiable message. The first-order input gradient
    taken with create_graph=True is still exact."""
    case = BY_NAME[name]
    x, y = batch(case, 5, seed=0)
    model, opt = _make(case)
    xi = x.clone().requires_grad_(True)
    loss = batch_loss(case, model(xi), y, "mean")
    (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
    torch.testing.assert_close(gx.detach(), _input_grad(case, x, y), **TOL)
    with pytest.raises(RuntimeError, match=r"DP layer .* differentiated twice .*gradient penalty.*Drop the penalty"):
        (loss + gx.square().sum()).backward()
