"""nn.MultiheadAttention: packed in_proj (self-attention, key is value, q != k != v), separate
q/k/v weights (kdim, vdim), bias or not, add_bias_kv (raw (1, 1, E) parameters), add_zero_attn,
masks, need_weights, batch_first True and False; against the naive per-sample clipped sum.

Every module gets its inputs batch first and transposes them for batch_first=False, so the
oracle's batches of one slice the batch dimension of every input.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DT, check_model, dp_step
from torch import nn

import dpkernels

E, H = 8, 2


class _Attn(nn.Module):
    def __init__(self, mode: str, batch_first: bool, need_weights=True, average=True, mask2d=None, causal=False, **kw):
        super().__init__()
        self.mode, self.batch_first, self.need_weights, self.average = mode, batch_first, need_weights, average
        self.mask2d, self.causal = mask2d, causal
        if mode == "kdim":
            kw.update(kdim=5, vdim=3)
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **kw)
        with torch.no_grad():  # torch zero-initialises the biases; make them matter
            for n, p in self.mha.named_parameters():
                if "bias" in n:
                    p.normal_(0, 0.5)

    def forward(self, x, ctx=None, ctx_v=None, kpm=None, mask3=None):
        t = (lambda z: z) if self.batch_first else (lambda z: None if z is None else z.transpose(0, 1))
        q = t(x)
        if self.mode == "self":
            k = v = q
        elif self.mode == "kv_same":
            k = v = t(ctx)
        else:
            k, v = t(ctx), t(ctx_v)
        mask = self.mask2d if mask3 is None else mask3.flatten(0, 1)  # (B, H, L, S) -> (B*H, L, S)
        out, w = self.mha(
            q,
            k,
            v,
            key_padding_mask=kpm,
            need_weights=self.need_weights,
            attn_mask=mask,
            average_attn_weights=self.average,
            is_causal=self.causal,
        )
        return t(out), w


def _batch(mode: str, B: int, L: int, S: int, kpm: bool, mask3: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    if mode == "self":
        S = L
    b = {"x": torch.randn(B, L, E, generator=g, dtype=DT), "y": torch.randn(B, L, E, generator=g, dtype=DT)}
    if mode != "self":
        b["ctx"] = torch.randn(B, S, 5 if mode == "kdim" else E, generator=g, dtype=DT)
    if mode in ("distinct", "kdim"):
        b["ctx_v"] = torch.randn(B, S, 3 if mode == "kdim" else E, generator=g, dtype=DT)
    if kpm:
        m = torch.zeros(B, S, dtype=torch.bool)
        if S > 1:
            m[0, -1] = True  # sample 0 ignores its last key; the others see all
        b["kpm"] = m
    if mask3:
        b["mask3"] = torch.randn(B, H, L, S, generator=g, dtype=DT)  # torch pads it for bias_kv / zero_attn
    return b


def _loss(model, b):
    out, w = model(b["x"], b.get("ctx"), b.get("ctx_v"), b.get("kpm"), b.get("mask3"))
    loss = (out - b["y"]).square().sum((1, 2))
    if w is not None:  # the returned weights carry gradient too
        loss = loss + w.square().flatten(1).sum(1)
    return loss


CASES = {
    "self": dict(mode="self", batch_first=True),
    "self-seqfirst-sdpa": dict(mode="self", batch_first=False, need_weights=False),
    "kv_same-kpm": dict(mode="kv_same", batch_first=True, kpm=True),
    "distinct-seqfirst-mask2d": dict(mode="distinct", batch_first=False, mask2d=True),
    "distinct-nobias-mask3-heads": dict(mode="distinct", batch_first=True, bias=False, mask3=True, average=False),
    "kdim-seqfirst-kpm": dict(mode="kdim", batch_first=False, kpm=True),
    "self-biaskv-zeroattn-masks": dict(
        mode="self", batch_first=True, add_bias_kv=True, add_zero_attn=True, kpm=True, mask2d=True
    ),
    "kdim-biaskv-seqfirst-sdpa": dict(mode="kdim", batch_first=False, add_bias_kv=True, need_weights=False, kpm=True),
    "distinct-zeroattn-mask3-sdpa": dict(
        mode="distinct", batch_first=True, add_zero_attn=True, mask3=True, need_weights=False
    ),
    "self-causal-sdpa": dict(mode="self", batch_first=True, causal=True, need_weights=False),
}


def _build(case: dict, L: int, S: int):
    case = dict(case)
    mode = case["mode"]
    kpm, mask3, mask2d = case.pop("kpm", False), case.pop("mask3", False), case.pop("mask2d", False)
    causal = case.get("causal", False)
    S = L if mode == "self" else S
    m2 = None
    if causal:
        m2 = torch.ones(L, S, dtype=torch.bool).triu(1)
    elif mask2d:
        m2 = torch.zeros(L, S, dtype=torch.bool)
        m2[:, 0] = L > 1  # every query but a lone one ignores key 0 (a row never masks all keys)
        m2[0, 0] = False
    torch.manual_seed(0)
    model = _Attn(mask2d=m2, **case).to(DT)
    return model, (mode, kpm, mask3)


@pytest.mark.parametrize("B,L,S", [(3, 4, 5), (1, 1, 1), (2, 1, 3)])
@pytest.mark.parametrize("name", list(CASES))
def test_mha(name, B, L, S):
    model, (mode, kpm, mask3) = _build(CASES[name], L, S)
    batch = _batch(mode, B, L, S, kpm, mask3)
    info = check_model(model, batch, _loss)
    m, opt = info["mean"]
    assert type(m.mha).__name__ == "DPMultiheadAttention" and type(m.mha.out_proj).__name__ == "DPLinear"
    assert m.mha in set(opt.reported) and m.mha.out_proj in set(opt.reported)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["distinct-seqfirst-mask2d", "self-biaskv-zeroattn-masks", "kdim-seqfirst-kpm"])
def test_mha_triton_backend(name):
    """Block views of G (g[..., lo:lo + E]) through the Triton kernels (CPU interpreter here)."""
    if "triton" not in dpkernels.available_backends():
        pytest.skip("triton backend not available")
    dpkernels.set_backend("triton")
    model, (mode, kpm, mask3) = _build(CASES[name], 4, 5)
    check_model(model, _batch(mode, 3, 4, 5, kpm, mask3), _loss)
    assert dpkernels.ops.last_backend["linear_norms"] == "triton"


def test_mha_frozen_in_proj_trains_out_proj():
    """Only out_proj (and bias_k/v) trainable: the module still runs its DP forward so out_proj is called."""
    model, (mode, kpm, mask3) = _build(CASES["self-biaskv-zeroattn-masks"], 4, 4)
    model.mha.in_proj_weight.requires_grad_(False)
    model.mha.in_proj_bias.requires_grad_(False)
    info = check_model(model, _batch(mode, 3, 4, 4, kpm, mask3), _loss)
    m, opt = info["sum"]
    assert m.mha.in_proj_weight.grad is None and m.mha.out_proj.weight.grad is not None
    assert m.mha.bias_k.grad is not None


def test_mha_twice_in_one_pass():
    """One module used twice (self- then cross-attention): per-sample gradient = sum over the uses."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x, ctx):
            h, _ = self.mha(x, x, x)
            out, _ = self.mha(h, ctx, ctx, need_weights=False)
            return out

    torch.manual_seed(0)
    model = Twice().to(DT)
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(3, 4, E, generator=g, dtype=DT), "ctx": torch.randn(3, 2, E, generator=g, dtype=DT)}
    check_model(model, batch, lambda m, b: m(b["x"], b["ctx"]).square().sum((1, 2)))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer(batch_first):
    """torch's own TransformerEncoderLayer (pre-norm, padding mask) calls the MHA twin (no fast path in
    training). Sequence first, its Linear layers would see (L, B, E): make_private refuses, naming the layer."""

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(E, H, 12, dropout=0.0, batch_first=batch_first, norm_first=True)
            self.head = nn.Linear(E, 2)

        def forward(self, x, kpm):
            h = self.layer(x if batch_first else x.transpose(0, 1), src_key_padding_mask=kpm)
            return self.head(h if batch_first else h.transpose(0, 1))

    torch.manual_seed(0)
    model = Enc().to(DT)
    g = torch.Generator().manual_seed(2)
    kpm = torch.zeros(3, 4, dtype=torch.bool)
    kpm[1, -1] = True
    x, y = torch.randn(3, 4, E, generator=g, dtype=DT), torch.randn(3, 4, 2, generator=g, dtype=DT)
    batch = {"x": x, "kpm": kpm, "y": y}

    def loss_fn(m, b):
        return (m(b["x"], b["kpm"]) - b["y"]).square().sum((1, 2))

    if not batch_first:
        with pytest.raises(ValueError, match=r"'layer' \(TransformerEncoderLayer\) has batch_first=False"):
            dp_step(model, batch, loss_fn, 1.0, "sum")
        return
    info = check_model(model, batch, loss_fn)
    m, _ = info["sum"]
    assert type(m.layer.self_attn).__name__ == "DPMultiheadAttention"


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_empty_batch(batch_first):
    model, _ = _build(dict(mode="self", batch_first=batch_first), 3, 3)
    batch = {"x": torch.zeros(0, 3, E, dtype=DT), "y": torch.zeros(0, 3, E, dtype=DT)}
    _, _, opt = dp_step(model, batch, _loss, 1.0, "sum", expected_batch_size=2.0)
    opt.step()
    for p in model.parameters():
        assert p.grad is not None and not p.grad.any()


def test_mha_unbatched_refused_and_plain_without_engine():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H).to(DT)
    ref = copy.deepcopy(mha)
    model = nn.Sequential()
    model.add_module("mha", mha)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=0.0, expected_batch_size=2.0)
    x = torch.randn(4, E, dtype=DT)
    with pytest.raises(ValueError, match="unbatched query"):
        model.mha(x, x, x)
    with torch.no_grad():  # no per-sample work: torch's own forward (fast path included)
        torch.testing.assert_close(model.mha(x, x, x)[0], ref(x, x, x)[0], rtol=0, atol=0)


def test_mha_computed_weight_refused():
    """A weight replaced by a computed tensor (adapters merged into it) would bypass clipping: refused."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("mha", nn.MultiheadAttention(E, H, batch_first=True).to(DT))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=0.0, expected_batch_size=2.0)
    w = model.mha._parameters.pop("in_proj_weight")
    model.mha.in_proj_weight = w * 1.0
    x = torch.randn(2, 3, E, dtype=DT)
    with pytest.raises(ValueError, match="in_proj_weight is a computed tensor"):
        model.mha(x, x, x)


def test_mha_dropout_runs():
    """Attention dropout in training mode: per-sample structure kept (no exact oracle: random masks)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("mha", nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True).to(DT))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(model, opt, noise_multiplier=0.0, max_grad_norm=1e-3, expected_batch_size=3.0)
    x = torch.randn(3, 4, E, dtype=DT)
    out, _ = model.mha(x, x, x)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert float(total) <= 1e-3 + 1e-9  # each of 3 samples clipped to 1e-3, divided by 3: norm <= 1e-3
