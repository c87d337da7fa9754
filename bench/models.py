"""Benchmark models, built from configs with random weights (no downloads).

Every trainable parameter lives in an nn.Linear, nn.Embedding, nn.LayerNorm, nn.Conv2d or
nn.GroupNorm, so `dpkernels.make_private`, Opacus and fastDP can all convert the models:
attention is written out (no nn.MultiheadAttention, no Hugging Face Conv1D), the ViT's class
token and position table are nn.Embedding rows looked up by index, and its patch embedding is
an nn.Linear on flattened patches (equal to a Conv2d with kernel = stride = patch size).

Position ids are either indexed per sample, shape (B, T) (``pos_ids="batch"``), or broadcast,
shape (1, T) as Hugging Face GPT-2 does (``pos_ids="broadcast"``): the (1, T, D) embedding is
added to the (B, T, D) token embedding, so autograd sums its output gradient over the batch
before the layer sees it. DP libraries must expand that input or refuse it (docs/design.md, section 2).

`build(name, batch, device)` returns a `Workload`: the model, a fixed random batch, the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------- transformer blocks


class Attention(nn.Module):
    """Multi-head self-attention from two nn.Linear layers: softmax(q k^T / sqrt(h)) v, then a projection."""

    def __init__(self, d: int, heads: int, causal: bool):
        super().__init__()
        if d % heads:
            raise ValueError(f"Attention: width {d} is not divisible by {heads} heads")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # SDPA holds no parameters; it is the same kernel for every mode (flash / memory-efficient on GPU).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Transformer block; pre-LN (GPT-2, ViT) or post-LN (BERT)."""

    def __init__(self, d: int, heads: int, causal: bool, pre_ln: bool):
        super().__init__()
        self.pre_ln = pre_ln
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads, causal)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, 4 * d)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_ln:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


def _positions(n: int, B: int, device: torch.device, mode: str) -> Tensor:
    """Position ids: (B, n) indexed per sample, or (1, n) broadcast across the batch."""
    pos = torch.arange(n, device=device)[None]
    if mode == "batch":  # materialised, as a data collator would hand it over (peers .view() the ids)
        return pos.repeat(B, 1)
    if mode == "broadcast":
        return pos
    raise ValueError(f"pos_ids must be 'batch' or 'broadcast', got {mode!r}")


# ----------------------------------------------------------------------------- models


class GPT(nn.Module):
    """GPT-2-like causal LM: token + position embeddings, pre-LN blocks, final LN, LM head (tied or not)."""

    def __init__(self, vocab: int, n_pos: int, d: int, layers: int, heads: int, tied: bool, pos_ids: str):
        super().__init__()
        self.pos_ids = pos_ids
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(n_pos, d)
        self.blocks = nn.ModuleList(Block(d, heads, causal=True, pre_ln=True) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(_positions(T, B, idx.device, self.pos_ids))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


class BERT(nn.Module):
    """BERT-like encoder for sequence classification: word + position + token-type embeddings, post-LN
    blocks, a tanh pooler on the first token and a linear classifier."""

    def __init__(self, vocab: int, n_pos: int, d: int, layers: int, heads: int, classes: int, pos_ids: str):
        super().__init__()
        self.pos_ids = pos_ids
        self.word = nn.Embedding(vocab, d)
        self.position = nn.Embedding(n_pos, d)
        self.token_type = nn.Embedding(2, d)
        self.ln = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(Block(d, heads, causal=False, pre_ln=False) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, classes)

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        types = torch.zeros_like(idx)
        x = self.word(idx) + self.position(_positions(T, B, idx.device, self.pos_ids)) + self.token_type(types)
        x = self.ln(x)
        for blk in self.blocks:
            x = blk(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class ViT(nn.Module):
    """Vision transformer: patches -> nn.Linear, a class token and position table as nn.Embedding rows,
    pre-LN blocks, final LN, linear head on the class token."""

    def __init__(self, image: int, patch: int, d: int, layers: int, heads: int, classes: int, pos_ids: str):
        super().__init__()
        if image % patch:
            raise ValueError(f"ViT: image size {image} is not a multiple of the patch size {patch}")
        self.patch, self.pos_ids = patch, pos_ids
        n = (image // patch) ** 2
        self.patch_embed = nn.Linear(3 * patch * patch, d)
        self.cls_token = nn.Embedding(1, d)
        self.pos_embed = nn.Embedding(n + 1, d)
        self.blocks = nn.ModuleList(Block(d, heads, causal=False, pre_ln=True) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, img: Tensor) -> Tensor:
        B, C, H, W = img.shape
        p = self.patch
        # (B, C, H, W) -> (B, N, C*p*p), the same ordering a Conv2d(kernel=stride=p) weight would use.
        patches = img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C * p * p)
        x = self.patch_embed(patches)
        cls = self.cls_token(torch.zeros(B, 1, dtype=torch.long, device=img.device))
        x = torch.cat([cls, x], dim=1)
        x = x + self.pos_embed(_positions(x.shape[1], B, img.device, self.pos_ids))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x)[:, 0])


class MLPNet(nn.Module):
    """Linear-only model (Linear, Tanh, Linear, ...) over a (B, T, d) input: the path every DP library supports."""

    def __init__(self, d_in: int, hidden: int, layers: int, classes: int):
        super().__init__()
        dims = [d_in] + [hidden] * layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return self.head(x)


class LSTMTagger(nn.Module):
    """A sequence tagger: nn.LSTM (batch first) over a (B, T, d) input and a Linear head on every position."""

    def __init__(self, d_in: int, hidden: int, layers: int, classes: int, bidirectional: bool = False):
        super().__init__()
        self.rnn = nn.LSTM(d_in, hidden, layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0])


def resnet18_gn(classes: int, blocks: tuple[int, int, int, int] = (2, 2, 2, 2), groups: int = 32) -> nn.Module:
    """torchvision ResNet-18 (BasicBlock, ``blocks`` per stage) with GroupNorm(groups, c) instead of BatchNorm."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, list(blocks), num_classes=classes, norm_layer=lambda c: nn.GroupNorm(groups, c))


class HFGPT2(nn.Module):
    """A stock Hugging Face GPT2LMHeadModel built from its config (random weights, tied wte/lm_head, the
    (1, T) position ids GPT-2 broadcasts), unedited; this wrapper only returns ``.logits`` so that every
    mode drives it like the other LMs. transformers is imported here, when such a model is built."""

    def __init__(self, vocab: int, n_pos: int, d: int, layers: int, heads: int):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab, n_positions=n_pos, n_embd=d, n_layer=layers, n_head=heads)
        self.lm = GPT2LMHeadModel(cfg)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids).logits


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Config:
    """A model and its input: ``kind`` picks the builder, ``args`` its keyword arguments."""

    kind: str  # gpt | hf-gpt2 | bert | vit | resnet | mlp | lstm
    args: dict[str, Any] = field(default_factory=dict)
    seq: int = 0  # T for token models
    image: int = 0  # H = W for image models
    classes: int = 0  # output classes (vocabulary for an LM)
    default_batch: int = 32
    notes: str = ""


_GPT_SMALL = dict(vocab=50257, n_pos=1024, d=768, layers=12, heads=12, tied=False, pos_ids="batch")
_GPT_TINY = dict(vocab=97, n_pos=16, d=32, layers=2, heads=2, tied=False, pos_ids="batch")
_BERT_BASE = dict(vocab=30522, n_pos=512, d=768, layers=12, heads=12, classes=2, pos_ids="batch")
_BERT_TINY = dict(vocab=89, n_pos=16, d=32, layers=2, heads=2, classes=2, pos_ids="batch")

CONFIGS: dict[str, Config] = {
    "gpt2-small": Config("gpt", _GPT_SMALL, seq=256, classes=50257, notes="12 x 768, 12 heads, V=50257, T=256"),
    "gpt2-small-tied": Config("gpt", {**_GPT_SMALL, "tied": True}, seq=256, classes=50257, notes="LM head tied to wte"),
    "gpt2-small-bcast": Config(
        "gpt", {**_GPT_SMALL, "pos_ids": "broadcast"}, seq=256, classes=50257, notes="position ids (1, T) broadcast"
    ),
    "gpt2-tiny": Config("gpt", _GPT_TINY, seq=8, classes=97, default_batch=4),
    "gpt2-tiny-tied": Config("gpt", {**_GPT_TINY, "tied": True}, seq=8, classes=97, default_batch=4),
    "gpt2-tiny-bcast": Config("gpt", {**_GPT_TINY, "pos_ids": "broadcast"}, seq=8, classes=97, default_batch=4),
    "hf-gpt2-small": Config(
        "hf-gpt2",
        dict(vocab=50257, n_pos=1024, d=768, layers=12, heads=12),
        seq=256,
        classes=50257,
        notes="stock transformers GPT2LMHeadModel from config: Conv1D, tied head, (1, T) position ids",
    ),
    "hf-gpt2-tiny": Config(
        "hf-gpt2", dict(vocab=97, n_pos=16, d=32, layers=2, heads=2), seq=8, classes=97, default_batch=4
    ),
    "bert-base": Config("bert", _BERT_BASE, seq=128, classes=2, notes="12 x 768, post-LN, T=128, 2 classes"),
    "bert-tiny": Config("bert", _BERT_TINY, seq=8, classes=2, default_batch=4),
    "vit-small-32": Config(
        "vit",
        dict(image=32, patch=4, d=384, layers=12, heads=6, classes=10, pos_ids="batch"),
        image=32,
        classes=10,
        notes="ViT-S/4 at 32x32: 65 tokens, 12 x 384",
    ),
    "vit-base-224": Config(
        "vit",
        dict(image=224, patch=16, d=768, layers=12, heads=12, classes=1000, pos_ids="batch"),
        image=224,
        classes=1000,
        notes="ViT-B/16 at 224x224: 197 tokens, 12 x 768",
    ),
    "vit-tiny": Config(
        "vit",
        dict(image=16, patch=4, d=32, layers=2, heads=2, classes=10, pos_ids="batch"),
        image=16,
        classes=10,
        default_batch=4,
    ),
    "resnet18-gn": Config(
        "resnet", dict(classes=10), image=32, classes=10, notes="torchvision ResNet-18, GroupNorm(32, c), 32x32"
    ),
    "resnet18-gn-tiny": Config(
        "resnet",
        dict(classes=10, blocks=(1, 1, 1, 1)),
        image=16,
        classes=10,
        default_batch=2,
        notes="one BasicBlock per stage, 16x16",
    ),
    "mlp-tiny": Config(
        "mlp", dict(d_in=12, hidden=24, layers=2, classes=5), seq=3, classes=5, default_batch=4, notes="Linear only"
    ),
    "lstm-small": Config(
        "lstm",
        dict(d_in=128, hidden=256, layers=2, classes=32),
        seq=64,
        classes=32,
        notes="2-layer LSTM tagger, 128 -> 256, T=64, a head per position",
    ),
    "lstm-tiny": Config(
        "lstm", dict(d_in=12, hidden=16, layers=2, classes=5, bidirectional=True), seq=5, classes=5, default_batch=4
    ),
}

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "gpt": GPT,
    "hf-gpt2": HFGPT2,
    "bert": BERT,
    "vit": ViT,
    "resnet": resnet18_gn,
    "mlp": MLPNet,
    "lstm": LSTMTagger,
}


@dataclass
class Workload:
    """A model on its device, a fixed random batch (x, y) and the mean cross-entropy loss."""

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    config: Config

    def loss(self, out: Tensor, criterion: Callable[..., Tensor] | None = None) -> Tensor:
        """Mean cross-entropy over every output position: for an LM, the mean over samples of the per-sequence
        mean over tokens (all sequences have length T). ``criterion``: a replacement (Opacus ghost's wrapper)."""
        flat, target = out.reshape(-1, out.shape[-1]), self.y.reshape(-1)
        if criterion is None:
            return F.cross_entropy(flat, target)
        if out.dim() == 3:  # Opacus ghost needs (B, T, C) to turn per-token losses into per-sequence ones
            return criterion(flat, target, shape=out.shape)
        return criterion(flat, target)


def get_config(name: str) -> Config:
    if name not in CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def build(name: str, batch: int, device: str | torch.device = "cpu", seed: int = 0, **overrides: Any) -> Workload:
    """The model ``name`` (random weights, fp32) and a fixed random batch of ``batch`` samples on ``device``."""
    cfg = get_config(name)
    if overrides:
        cfg = replace(cfg, args={**cfg.args, **overrides})
    torch.manual_seed(seed)
    model = _BUILDERS[cfg.kind](**cfg.args).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    if cfg.kind in ("gpt", "hf-gpt2", "bert"):
        x = torch.randint(0, cfg.args["vocab"], (batch, cfg.seq), generator=g)
        y = torch.randint(0, cfg.classes, (batch,) if cfg.kind == "bert" else (batch, cfg.seq), generator=g)
    elif cfg.kind in ("vit", "resnet"):
        x = torch.randn(batch, 3, cfg.image, cfg.image, generator=g)
        y = torch.randint(0, cfg.classes, (batch,), generator=g)
    else:
        x = torch.randn(batch, cfg.seq, cfg.args["d_in"], generator=g)
        y = torch.randint(0, cfg.classes, (batch, cfg.seq), generator=g)
    return Workload(name, model, x.to(device), y.to(device), cfg)


def describe(model: nn.Module) -> dict[str, Any]:
    """Parameter count (shared parameters once) and the layer types holding trainable parameters."""
    kinds: dict[str, int] = {}
    for m in model.modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "parameters_millions": round(n / 1e6, 3), "layers": kinds}
