"""Hugging Face models built from tiny configs, converted by make_private with no edit to their code.

Each test compares one noiseless DP step with the naive clipped sum of per-sample gradients
(conftest.check_model: a float64 loop over batches of one, clipping active).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import transformers  # noqa: E402,F401  (a test dependency: fail, never skip, when it is missing)
from conftest import (
    DT,
    TOL,
    check_model,
    clipped_sum,
    cls_loss,
    dp_step,
    gpt2,
    hf_vit,
    image_batch,
    llama,
    lm_loss,
    per_sample_grads,
    per_sample_norms,
    token_batch,
)
from torch import nn

import dpkernels  # noqa: E402
from dpkernels.nn import DPModule  # noqa: E402


def _types(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


# ----------------------------------------------------------------------------- GPT-2


@pytest.mark.parametrize("B,T", [(3, 5), (1, 1), (4, 8)])
def test_gpt2(B, T):
    """Conv1D twins, tied wte/lm_head (exact cross term) and (1, T) position ids broadcast over the batch."""
    info = check_model(gpt2(), token_batch(B, T), lm_loss)
    m, _ = info["mean"]
    assert {"DPConv1D", "DPEmbedding", "DPLayerNorm"} <= _types(m)
    assert m.lm_head.weight is m.transformer.wte.weight  # still tied after conversion


def test_gpt2_builtin_loss_and_attention_mask():
    """The model's own loss (labels=..., mean over the batch's tokens) with padding masked out."""
    B, T = 3, 6
    batch = token_batch(B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # sample 1 is padded; its padded positions still have a defined loss target
    batch["attention_mask"] = mask

    def one_sample_loss(model, b):  # the oracle's batches of one: HF's loss is then that sample's mean
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"]).loss[None]

    model = gpt2()
    ps = per_sample_grads(copy.deepcopy(model), batch, one_sample_loss)
    R = float(per_sample_norms(ps).median())
    want, c = clipped_sum(ps, R, "mean", float(B))
    assert bool((c < 1).any())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=float(B), loss_reduction="mean"
    )
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"])
    out.loss.backward()  # equal-length samples: the mean over all B*(T-1) targets is the mean of the B means
    for n, p in model.named_parameters():
        # HF's loss casts the logits to float32 (logits.float()), so both sides carry float32 rounding
        # (observed ~2e-8 absolute); a wrong clip factor or per-sample gradient is O(1e-3) or more here.
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=lambda s, n=n: f"{n}: {s}")


def test_gpt2_accumulation_and_noise():
    """Two micro-batches (``prev`` of Conv1D goes in transposed) equal one clipped sum over their union;
    with noise, every parameter (tied table included) gets N(0, (sigma R / B_exp)^2) on top of it."""
    B, T, sigma = 4, 4, 2.0
    batch = token_batch(B, T)
    model = gpt2()
    ps = per_sample_grads(copy.deepcopy(model), batch, lm_loss)
    R = float(per_sample_norms(ps).median())
    want, _ = clipped_sum(ps, R, "mean", float(B))
    for noise in (0.0, sigma):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        m, opt = dpkernels.make_private(
            m, opt, noise_multiplier=noise, max_grad_norm=R, expected_batch_size=float(B), accumulation_steps=2, seed=3
        )
        for half in (slice(0, 1), slice(1, B)):  # unequal micro-batches: 1 and 3 samples
            losses = lm_loss(m, {k: v[half] for k, v in batch.items()})
            losses.mean().backward()  # the engine undoes each micro-batch's 1/|micro| and divides by B
        opt.step()
        if noise == 0.0:
            for n, p in m.named_parameters():
                torch.testing.assert_close(p.grad, want[n], **TOL, msg=lambda s, n=n: f"{n}: {s}")
        else:
            z = torch.cat([(p.grad - want[n]).flatten() for n, p in m.named_parameters()])
            std = noise * R / B
            # ~1.3k iid normals: the sample std is within 4 standard errors (4 / sqrt(2n) ~ 8%) of std.
            assert abs(float(z.std()) / std - 1) < 0.08
            for n, p in m.named_parameters():
                assert float((p.grad - want[n]).abs().max()) > 0, f"{n} got no noise"


def test_gpt2_two_pass_and_layer_wise():
    """The other strategy and per-layer clipping groups go through the same twins."""
    batch = token_batch(3, 4)
    model = gpt2()
    ps = per_sample_grads(copy.deepcopy(model), batch, lm_loss)
    R = float(per_sample_norms(ps).median())
    want, _ = clipped_sum(ps, R, "sum", 3.0)
    _, grads, _ = dp_step(copy.deepcopy(model), batch, lm_loss, R, "sum", strategy="two-pass")
    for n in want:
        torch.testing.assert_close(grads[n], want[n], **TOL, msg=lambda s, n=n: f"{n}: {s}")
    _, grads, opt = dp_step(copy.deepcopy(model), batch, lm_loss, R, "sum", groups="layer-wise")
    assert len(opt.engine.groups) > 10
    assert all(g is not None for g in grads.values())


def test_gpt2_gradient_checkpointing():
    """Hugging Face's gradient checkpointing (non-reentrant, its default) recomputes each block inside
    the backward pass; the DP step still equals the naive clipped sum (book-keeping: two-pass refuses it,
    tests/engine/test_checkpointing.py)."""
    model = gpt2()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    check_model(model, token_batch(3, 4), lm_loss, reductions=("mean",), strategy="bk")


# ----------------------------------------------------------------------------- BERT, Llama


@pytest.mark.parametrize("B,T", [(3, 6), (1, 1)])
def test_bert_sequence_classification(B, T):
    """Word/position/token-type embeddings (position ids (1, T), token types an expanded buffer), padding."""
    from conftest import bert

    g = torch.Generator().manual_seed(2)
    batch = token_batch(B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    if T > 2:
        mask[0, -2:] = 0
    batch["attention_mask"] = mask
    if B > 1:  # otherwise BERT expands its (1, T) token-type buffer to the batch
        batch["token_type_ids"] = torch.randint(0, 2, (B, T), generator=g)
    batch["labels"] = torch.randint(0, 3, (B,), generator=g)
    info = check_model(bert(), batch, cls_loss)
    m, _ = info["sum"]
    assert {"DPEmbedding", "DPLayerNorm", "DPLinear"} <= _types(m)


@pytest.mark.parametrize("B,T", [(3, 5), (2, 1)])
def test_llama(B, T):
    """LlamaRMSNorm twin (own class), rotary (no parameters), no biases, untied head."""
    # LlamaRMSNorm normalises in float32 even in a float64 model (both sides run its code), so the
    # gradients below it carry float32 rounding: 1e-5 relative covers it (a wrong xhat is O(1)).
    info = check_model(llama(), token_batch(B, T), lm_loss, tol=dict(rtol=1e-5, atol=1e-7))
    m, _ = info["mean"]
    assert "DPLlamaRMSNorm" in _types(m)
    assert not any(type(x).__name__ == "LlamaRMSNorm" for x in m.modules())


# ----------------------------------------------------------------------------- ViT (raw parameters)


@pytest.mark.parametrize("B", [3, 1])
def test_vit_image_classification(B):
    """cls_token (1, 1, D) and position_embeddings (1, N+1, D) are raw parameters broadcast over the batch."""
    model = hf_vit()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    info = check_model(model, image_batch(B), cls_loss)
    m, _ = info["mean"]
    emb = m.vit.embeddings
    assert isinstance(emb, DPModule) and type(emb).__name__ == "DPViTEmbeddings"
    # Outside forward the attribute is the parameter itself, and the state_dict is untouched.
    assert isinstance(emb.cls_token, nn.Parameter) and emb.cls_token is emb._parameters["cls_token"]
    sd2 = m.state_dict()
    assert list(sd2) == list(sd)
    for k in sd:
        torch.testing.assert_close(sd2[k], sd[k], rtol=0, atol=0)


def test_vit_masked_image_modeling_mask_token():
    """mask_token (1, 1, D) is expanded to (B, N, D) and mixed in per sample by bool_masked_pos."""
    from transformers import ViTConfig, ViTForMaskedImageModeling

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        encoder_stride=4,
    )
    model = ViTForMaskedImageModeling(cfg).to(DT)
    with torch.no_grad():
        model.vit.embeddings.mask_token.normal_()
    batch = image_batch(3)
    batch["bool_masked_pos"] = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)

    def loss_fn(m, b):
        out = m(pixel_values=b["pixel_values"], bool_masked_pos=b["bool_masked_pos"])
        return (out.reconstruction - b["pixel_values"]).square().flatten(1).sum(1)

    check_model(model, batch, loss_fn)


def test_vit_accumulation():
    """Tapped parameters chain micro-batch sums through ``prev``."""
    B = 3
    batch = image_batch(B)
    model = hf_vit()
    ps = per_sample_grads(copy.deepcopy(model), batch, cls_loss)
    R = float(per_sample_norms(ps).median())
    want, _ = clipped_sum(ps, R, "sum", float(B))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model,
        opt,
        noise_multiplier=0.0,
        max_grad_norm=R,
        expected_batch_size=float(B),
        loss_reduction="sum",
        accumulation_steps=2,
    )
    for half in (slice(0, 2), slice(2, 3)):
        cls_loss(model, {k: v[half] for k, v in batch.items()}).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], **TOL, msg=lambda s, n=n: f"{n}: {s}")


class _Bias(nn.Module):
    """A raw (1, D) parameter broadcast over the batch, in a class dpkernels does not know."""

    def __init__(self, d: int):
        super().__init__()
        self.offset = nn.Parameter(torch.randn(1, d))
        self.fc = nn.Linear(d, 2)

    def forward(self, x):
        return self.fc(x + self.offset + 0.5 * self.offset * x)  # two reads: per-sample grad is their sum


def test_unknown_raw_parameter_refused_then_opt_in():
    torch.manual_seed(0)
    model = _Bias(5).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match=r"'offset'.*no DP layer covers it"):
        dpkernels.make_private(copy.deepcopy(model), opt, noise_multiplier=0.0, expected_batch_size=4.0)

    from dpkernels.nn.tap import tap_parameters

    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(4, 5, generator=g, dtype=DT), "y": torch.randn(4, 2, generator=g, dtype=DT)}

    def loss_fn(m, b):
        return (m(b["x"]) - b["y"]).square().sum(1)

    ref = copy.deepcopy(model)
    tap_parameters(model, ["offset"])
    check_model(model, batch, loss_fn)
    # The tapped module behaves as before when no engine is attached.
    torch.testing.assert_close(model(batch["x"]), ref(batch["x"]), rtol=0, atol=0)


def test_tap_rejects_bad_parameters():
    from dpkernels.nn.tap import tap_parameters

    m = _Bias(3)
    with pytest.raises(ValueError, match="leading dimension of 1"):
        tap_parameters(m.fc, ["bias"])
    m.extra = nn.Parameter(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\['extra'\] besides the tapped"):
        tap_parameters(m, ["offset"])
    with pytest.raises(ValueError, match="no parameter 'nope'"):
        tap_parameters(m, ["nope"])


# ----------------------------------------------------------------------------- Conv1D layer, import hygiene


@pytest.mark.parametrize("B,T", [(0, 3), (1, 1), (3, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_conv1d_layer(B, T, reduction):
    """DPConv1D alone: y = x W + b with W (d_in, d_out), odd sizes; B = 0 gives zero gradients."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(3, 7)).to(DT)
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(B, T, 5, generator=g, dtype=DT), "y": torch.randn(B, T, 3, generator=g, dtype=DT)}

    def loss_fn(m, b):
        return (m(b["x"]) - b["y"]).square().sum((1, 2))

    if B == 0:
        _, _, opt = dp_step(model, batch, loss_fn, 1.0, reduction, expected_batch_size=2.0)
        opt.step()  # no sample reached any layer: the step still sets every gradient (to the noise, here 0)
        for p in model.parameters():
            assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
        return
    check_model(model, batch, loss_fn, reductions=(reduction,))


def test_transformers_not_imported():
    """dpkernels never imports transformers itself; convert meets Hugging Face classes by name."""
    code = (
        "import sys, torch, dpkernels\n"
        "m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.MultiheadAttention(4, 2))\n"
        "dpkernels.convert.convert_layers(m)\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- RMSNorm copies


def _rmsnorm_family() -> list[str]:
    from dpkernels.convert import THIRD_PARTY_LAYERS

    return sorted(k for k, v in THIRD_PARTY_LAYERS.items() if v.endswith(":llama_style_rmsnorm"))


def _import(qualified: str) -> type:
    import importlib

    mod, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(mod), name)


@pytest.mark.parametrize("qualified", _rmsnorm_family())
def test_llama_style_rmsnorm_copies(qualified):
    """Each registered copy of LlamaRMSNorm (Mistral, Qwen2, ...) gets the Llama twin; pickles by value."""
    import io

    cls = _import(qualified)
    torch.manual_seed(0)
    norm = cls(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    model = nn.Sequential(nn.Linear(5, 6), norm, nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(3, 4, 5, generator=g, dtype=DT), "y": torch.randn(3, 4, 3, generator=g, dtype=DT)}

    def loss_fn(m, b):
        return (m(b["x"]) - b["y"]).square().sum((1, 2))

    # The norm's float32 statistics (its own code, on both sides): float32-level agreement.
    info = check_model(model, batch, loss_fn, tol=dict(rtol=1e-5, atol=1e-7))
    m, _ = info["mean"]
    assert isinstance(m[1], DPModule) and isinstance(m[1], cls) and type(m[1]).__name__ == f"DP{cls.__name__}"
    buf = io.BytesIO()
    torch.save(m[1], buf)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)) is type(m[1])


def test_rmsnorm_with_other_code_refused():
    """GemmaRMSNorm computes (1 + w) * xhat: not LlamaRMSNorm's code, so no twin, and make_private names it."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from dpkernels.nn.hf import llama_style_rmsnorm

    assert llama_style_rmsnorm(GemmaRMSNorm) is None
    model = nn.Sequential(nn.Linear(4, 6), GemmaRMSNorm(6))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"'1.weight'.*GemmaRMSNorm"):
        dpkernels.make_private(model, opt, noise_multiplier=1.0, expected_batch_size=2.0)


def test_vit_interpolate_pos_encoding_refused():
    """Resizing the position table reshapes it to a batch of one: refused under DP, plain without it."""
    model = hf_vit()
    x = image_batch(2, size=16)["pixel_values"]
    with torch.no_grad():
        want = model(pixel_values=x, interpolate_pos_encoding=True).logits
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=0.0, expected_batch_size=2.0)
    with pytest.raises(ValueError, match=r"interpolate_pos_encoding=\.\.\.\) cannot give exact per-sample"):
        model(pixel_values=x, interpolate_pos_encoding=True)
    with torch.no_grad():  # evaluation at another resolution still works
        torch.testing.assert_close(model(pixel_values=x, interpolate_pos_encoding=True).logits, want, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "vit"])
def test_triton_backend(name):
    """The same models through the Triton kernels (CPU interpreter here): the strided views the twins hand
    over (Conv1D's W^T, tapped gradients) must be read correctly."""
    if "triton" not in dpkernels.available_backends():
        pytest.skip("triton backend not available")
    dpkernels.set_backend("triton")
    if name == "gpt2":
        check_model(gpt2(), token_batch(3, 4), lm_loss)
    else:
        check_model(hf_vit(), image_batch(3), cls_loss)
    assert dpkernels.ops.last_backend["linear_norms"] == "triton"
