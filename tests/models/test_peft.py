"""Parameter-efficient fine-tuning: PEFT LoRA adapters and bias-only training.

Only trainable parameters get per-sample work, clipped sums and noise; frozen base layers stay
plain torch computations (they never hand anything to the engine and get no gradient). Compared
with the naive clipped sum of per-sample gradients of the trainable parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DT, check_model, dp_step, gpt2, lm_loss, token_batch
from torch import nn

# transformers deprecates an attribute PEFT still reads; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

import dpkernels  # noqa: E402
from dpkernels.nn import DPModule  # noqa: E402


def _check_only_trainable_work(model: nn.Module, opt) -> None:
    """Frozen layers: not in the engine, never reported a backward, no norm method, no grad."""
    eng = opt.engine
    trainable = {m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    assert set(eng.modules.values()) == trainable
    reported = set(opt.reported)
    assert reported == trainable, "every trainable layer, and only those, reported per-sample work"
    frozen_dp = [m for m in model.modules() if isinstance(m, DPModule) and m not in trainable]
    assert frozen_dp, "the test needs frozen DP layers"
    for m in frozen_dp:
        assert m._dp_engine is None and m.dp_norm_method == "-"
        assert all(p.grad is None for p in m.parameters(recurse=False))


def _lora_gpt2():
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=2,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores W as (d_in, d_out)
        init_lora_weights=False,  # random A and B: with B = 0 the gradient of A would vanish
    )
    return get_peft_model(gpt2(), cfg)


@pytest.mark.parametrize("B,T", [(3, 5), (1, 1)])
def test_lora_gpt2(B, T):
    model = _lora_gpt2()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    info = check_model(model, token_batch(B, T), lm_loss)
    for red in ("mean", "sum"):
        m, opt = info[red]
        _check_only_trainable_work(m, opt)
        # The frozen base layers under the adapters are the DP twins, running torch's plain forward.
        bases = [x.base_layer for x in m.modules() if hasattr(x, "base_layer") and hasattr(x, "lora_A")]
        assert bases and all(type(b).__name__ == "DPConv1D" for b in bases)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 9)
        self.fc2 = nn.Linear(9, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("B,T", [(4, 3), (1, 1)])
def test_lora_mlp_with_modules_to_save(B, T, reduction):
    """LoRA on fc1/fc2 (trainable A, B), the head trained in full through modules_to_save (a copy)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(
        r=3, lora_alpha=6, target_modules=["fc1", "fc2"], modules_to_save=["head"], init_lora_weights=False
    )
    model = get_peft_model(_MLP().to(DT), cfg)
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(B, T, 6, generator=g, dtype=DT), "y": torch.randn(B, T, 3, generator=g, dtype=DT)}

    def loss_fn(m, b):
        return (m(b["x"]) - b["y"]).square().sum((1, 2))

    info = check_model(model, batch, loss_fn, reductions=(reduction,))
    m, opt = info[reduction]
    _check_only_trainable_work(m, opt)
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trained) and any("lora_B" in n for n in trained)


def test_bias_only_gpt2():
    """BitFit: every weight frozen (the tied table too), biases of Conv1D and LayerNorm trained."""
    model = gpt2()
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".bias"))
    info = check_model(model, token_batch(3, 4), lm_loss)
    m, opt = info["mean"]
    conv = m.transformer.h[0].attn.c_attn
    assert conv.dp_norm_method == "bias-only" and conv.weight.grad is None
    assert opt.engine.modules  # layers with a trainable bias take part, with the bias norm only
    assert m.transformer.wte._dp_engine is None and m.transformer.wte.weight.grad is None


def test_frozen_model_refused():
    model = gpt2()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        dpkernels.make_private(
            model,
            torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
            noise_multiplier=1.0,
            expected_batch_size=4.0,
        )


def test_lora_noise_only_on_trainable():
    """With noise, the adapters' gradients are noised; the frozen base weights get nothing at all."""
    model = _lora_gpt2()
    batch = token_batch(2, 3)
    base = copy.deepcopy(model)
    dp_step(model, batch, lm_loss, 1.0, "mean")  # the noiseless gradients
    m2 = copy.deepcopy(base)
    opt2 = torch.optim.SGD([p for p in m2.parameters() if p.requires_grad], lr=0.0)
    m2, opt2 = dpkernels.make_private(m2, opt2, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2.0)
    lm_loss(m2, batch).mean().backward()
    opt2.step()
    for (n, p), (_, q) in zip(m2.named_parameters(), model.named_parameters(), strict=True):
        if p.requires_grad:
            assert float((p.grad - q.grad).abs().max()) > 0, f"{n} got no noise"
        else:
            assert p.grad is None


def test_lora_on_multihead_attention_refused():
    """PEFT's LoRA on nn.MultiheadAttention merges adapters into its weights: refused, with the reason."""
    from peft import LoraConfig, get_peft_model

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    model = get_peft_model(Attn(), LoraConfig(r=2, target_modules=["mha"]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"out_proj is a Linear.*PEFT LoRA on a MultiheadAttention"):
        dpkernels.make_private(model, opt, noise_multiplier=1.0, expected_batch_size=2.0)
