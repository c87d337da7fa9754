"""Tiny real models (Hugging Face, torchvision) and the suite's naive per-sample oracle (tests/oracle.py) on them.

The oracle runs the *unconverted* float64 model once per sample (a batch of one, so nothing the
batched code does can leak into it), takes torch.autograd.grad of that sample's loss, clips the
per-sample gradients over all trainable parameters with the abadi rule and sums them. The DP side
runs `make_private` on an identical copy with noise_multiplier=0 and one batched step.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import oracle
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dpkernels

DT = torch.float64
Batch = dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]  # (model, batch) -> (B,) per-sample losses


def batch_size(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def per_sample_grads(model: nn.Module, batch: Batch, loss_fn: LossFn) -> dict[str, Tensor]:
    """{name: (B, *shape)} gradients of each sample's loss (the suite's one oracle, tests/oracle.py)."""
    return oracle.per_sample_grads(model, loss_fn, batch)


def per_sample_norms(ps: dict[str, Tensor]) -> Tensor:
    return oracle.sq_norms(ps).sqrt()


def clipped_sum(ps: dict[str, Tensor], R: float, reduction: str, expected: float) -> tuple[dict[str, Tensor], Tensor]:
    """sum_i c_i g_i (divided by the expected batch size for a mean loss), c_i = min(1, R / (||g_i|| + 1e-6))."""
    c = oracle.clip(per_sample_norms(ps), R)
    div = expected if reduction == "mean" else 1.0
    return oracle.clipped_update(ps, [list(ps)], [R], div), c


def dp_step(model: nn.Module, batch: Batch, loss_fn: LossFn, R: float, reduction: str, **kw):
    """One noiseless DP step on ``model`` (converted in place); returns (losses, grads by name, optimizer)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    kw.setdefault("expected_batch_size", float(batch_size(batch)))
    model, opt = dpkernels.make_private(
        model,
        opt,
        noise_multiplier=0.0,
        max_grad_norm=R,
        loss_reduction=reduction,
        **kw,
    )
    eng = opt.engine
    reported: list[nn.Module] = []  # every module that handed per-sample work to the engine
    on_backward = eng.on_backward

    def spy(module, saved, g, *node):
        reported.append(module)
        on_backward(module, saved, g, *node)

    eng.on_backward = spy
    opt.reported = reported  # type: ignore[attr-defined]
    losses = loss_fn(model, batch)
    loss = losses.mean() if reduction == "mean" else losses.sum()
    opt.backward(loss)
    del eng.on_backward  # back to the method (a local function would make the model unpicklable)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return losses, grads, opt


# float64 throughout; the two sides differ only in summation order (a handful of O(1) terms per
# entry), so 1e-9 relative / 1e-11 absolute is loose by orders of magnitude yet far below any
# error a wrong per-sample gradient, clip factor or broadcast would make (those are O(1)).
TOL = dict(rtol=1e-9, atol=1e-11)


def check_model(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    reductions: tuple[str, ...] = ("mean", "sum"),
    tol: dict | None = None,
    **kw,
) -> dict[str, object]:
    """Assert that one DP step on ``model`` equals the naive clipped sum, for each loss reduction.

    R is the median per-sample norm, so that some samples are clipped (asserted) and, with B >= 3,
    some are not. Also checks that the converted model computes the same losses, that every
    trainable parameter gets a gradient and every frozen one none. Returns diagnostics.
    """
    tol = tol or TOL
    ref = copy.deepcopy(model)
    ps = per_sample_grads(ref, batch, loss_fn)
    norms = per_sample_norms(ps)
    R = float(norms.median()) if norms.numel() else 1.0
    assert R > 0, "degenerate test: zero per-sample gradients"
    with torch.no_grad():
        want_losses = loss_fn(ref, batch)
    info: dict[str, object] = {"R": R, "norms": norms}
    for red in reductions:
        m = copy.deepcopy(model)
        want, c = clipped_sum(ps, R, red, float(batch_size(batch)))
        assert bool((c < 1).any()), "clipping must be active in this test"
        losses, grads, opt = dp_step(m, batch, loss_fn, R, red, **kw)
        torch.testing.assert_close(losses.detach(), want_losses, **tol)
        assert set(grads) == set(want)
        for n in want:
            assert grads[n] is not None, f"{n} got no gradient"
            torch.testing.assert_close(grads[n], want[n], **tol, msg=lambda s, n=n: f"{n} ({red}): {s}")
        for n, p in m.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, f"frozen {n} got a gradient"
        info[red] = (m, opt)
    return info


# ----------------------------------------------------------------------------- tiny models


def _quiet():
    warnings.filterwarnings("ignore", message=".*token_id.*")
    import transformers

    transformers.logging.set_verbosity_error()


def gpt2(seed: int = 0, **over) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet()
    cfg = dict(
        vocab_size=29,
        n_positions=8,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg.update(over)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**cfg)).to(DT)


def llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=29,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    m = LlamaForCausalLM(cfg).to(DT)
    with torch.no_grad():  # RMSNorm weights start at 1: perturb so that a wrong xhat * g would show
        for mod in m.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.weight.add_(0.3 * torch.randn_like(mod.weight))
    return m


def bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    _quiet()
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=29,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=8,
        type_vocab_size=2,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    return BertForSequenceClassification(cfg).to(DT)


def hf_vit(seed: int = 0) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    _quiet()
    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    m = ViTForImageClassification(cfg).to(DT)
    with torch.no_grad():  # HF initialises cls_token / position_embeddings near 0; make them matter
        m.vit.embeddings.cls_token.normal_()
        m.vit.embeddings.position_embeddings.normal_()
    return m


def tv_vit(seed: int = 0) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    m = VisionTransformer(
        image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24, num_classes=3
    )
    with torch.no_grad():  # torchvision zero-initialises the class token and the head
        m.class_token.normal_()
        for p in m.heads.parameters():
            p.normal_(0, 0.3)
    return m.to(DT)


# ----------------------------------------------------------------------------- data and losses


def token_batch(B: int, T: int, vocab: int = 29, seed: int = 1, **extra: Tensor) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, vocab, (B, T), generator=g),
        "labels": torch.randint(0, vocab, (B, T), generator=g),
        **extra,
    }


def image_batch(B: int, classes: int = 3, size: int = 8, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(B, 3, size, size, generator=g, dtype=DT),
        "labels": torch.randint(0, classes, (B,), generator=g),
    }


def lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Per-sample mean token cross-entropy of a causal LM (targets given, so T = 1 works)."""
    kw = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**kw).logits
    return F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none").mean(1)


def cls_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Per-sample cross-entropy of a Hugging Face classifier."""
    kw = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**kw).logits, batch["labels"], reduction="none")


def tv_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Per-sample cross-entropy of a torchvision classifier (positional image input)."""
    return F.cross_entropy(model(batch["pixel_values"]), batch["labels"], reduction="none")
