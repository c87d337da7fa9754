"""Fine-tune GPT-2 with LoRA under differential privacy: peft.get_peft_model + dpkernels.make_private.

Nothing is downloaded. The model is a Hugging Face GPT2LMHeadModel built from a tiny config; no
pretrained checkpoint is reachable here, so the script first pretrains it briefly, without privacy,
on a "public" corpus, then fine-tunes LoRA adapters with DP on a "private" one -- the usual shape of
a DP fine-tune. Both corpora are generated in code from a small seeded grammar ("the quiet heron
watches the river at dawn."), tokenised by characters; the private one talks about other people and
things (names and objects the public text never uses), so the fine-tune has something to learn. A
held-out slice of the private grammar measures the loss.

Only the LoRA adapters train under DP (peft freezes the base). make_private swaps the adapters'
nn.Linear for DPLinear (per-sample norms by ghost norm, no per-sample gradient), converts GPT-2's
Conv1D, Embedding and LayerNorm too (frozen: they do no per-sample work), and accounts the privacy
with RDP; batches are Poisson samples (dpkernels.data.poisson_loader).

    python examples/gpt2_lora_dp.py            # about a minute on a laptop CPU
    python examples/gpt2_lora_dp.py --quick    # a few steps of a smaller model, for the tests
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

import dpkernels
from dpkernels.data import poisson_loader

PUBLIC = {
    "subject": ["the quiet heron", "a small fox", "the old miller", "my sister", "a tired horse", "the wind"],
    "object": ["the river", "a lantern", "the hill", "an open gate", "the last boat", "a red kite"],
}
PRIVATE = {
    "subject": ["doctor okafor", "uncle bartholomew", "the night nurse", "agnieszka", "our landlord"],
    "object": ["the pharmacy", "a brown envelope", "the waiting room", "flat nineteen", "the overdue rent"],
}
VERBS = ["watches", "follows", "crosses", "remembers", "carries", "finds", "hears"]
ENDINGS = ["at dawn", "in the rain", "before supper", "without a sound", "every morning", "near the mill", ""]


def make_text(n_sentences: int, words: dict[str, list[str]], seed: int) -> str:
    """Sentences "subject verb object [ending]." drawn from a small grammar with a seeded RNG."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        parts = [rng.choice(words["subject"]), rng.choice(VERBS), rng.choice(words["object"]), rng.choice(ENDINGS)]
        out.append(" ".join(w for w in parts if w) + ".")
    return " ".join(out)


def windows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length`` tokens: one training example each."""
    n = ids.numel() // length
    return ids[: n * length].view(n, length)


def build_model(vocab_size: int, block: int, quick: bool) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block,
        n_embd=32 if quick else 64,
        n_layer=1 if quick else 2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def pretrain(model: torch.nn.Module, data: torch.Tensor, steps: int, seed: int) -> None:
    """Non-private pretraining on the public corpus (stands in for downloading GPT-2's weights)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = data[torch.randint(0, len(data), (32,), generator=gen)]
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def add_lora(model: torch.nn.Module) -> torch.nn.Module:
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight as (in, out)
        lora_dropout=0.0,
    )
    return get_peft_model(model, lora)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, data: torch.Tensor) -> float:
    model.eval()
    loss = float(model(input_ids=data, labels=data).loss)
    model.train()
    return loss


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps of a smaller model (for tests)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon for the whole run")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--batch", type=float, default=32.0, help="expected (Poisson) batch size")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 200)
    torch.manual_seed(args.seed)

    block = 32
    public = make_text(300 if args.quick else 3000, PUBLIC, seed=args.seed)
    private = make_text(300 if args.quick else 3000, PRIVATE, seed=args.seed + 1)
    held_out = make_text(100, PRIVATE, seed=args.seed + 2)
    chars = sorted(set(public + private + held_out))
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(text: str) -> torch.Tensor:
        return windows(torch.tensor([stoi[c] for c in text]), block)

    train, val = encode(private), encode(held_out)
    print(f"data: {len(train)} private windows of {block} characters, vocabulary {len(chars)}")

    model = build_model(len(chars), block, args.quick)
    t0 = time.perf_counter()
    pretrain(model, encode(public), 2 if args.quick else 200, args.seed)
    print(f"pretrained on the public corpus (no privacy) in {time.perf_counter() - t0:.1f} s")
    model = add_lora(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: GPT-2 from a tiny config, {n_train} LoRA parameters train under DP")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    q = args.batch / len(train)
    model, optimizer = dpkernels.make_private(
        model,
        optimizer,
        target_epsilon=args.epsilon,
        target_delta=args.delta,
        sample_rate=q,
        dataset_size=len(train),
        steps=steps,
        max_grad_norm=1.0,
        seed=args.seed,  # the noise's seed: reproducible runs (draw it at random, the default, in real use)
    )
    sigma = optimizer.engine.noise_multiplier
    print(f"DP: sample rate {q:.4f}, noise multiplier {sigma:.3f} for epsilon {args.epsilon} after {steps} steps")

    loader = poisson_loader(
        torch.utils.data.TensorDataset(train), q, steps=steps, generator=torch.Generator().manual_seed(args.seed)
    )
    start = eval_loss(model, val)
    print(f"held-out private loss before the fine-tune: {start:.3f} (uniform guess: {math.log(len(chars)):.3f})")
    t0 = time.perf_counter()
    for step, (ids,) in enumerate(loader, 1):
        optimizer.zero_grad()
        if len(ids) > 0:  # an empty Poisson batch is still a step: its update is noise only
            model(input_ids=ids, labels=ids).loss.backward()  # HF's mean over tokens = mean of per-sample means
        optimizer.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            eps = optimizer.accountant.get_epsilon(args.delta)
            print(f"step {step:4d}  held-out loss {eval_loss(model, val):.3f}  epsilon {eps:.2f}")
    end = eval_loss(model, val)
    eps = optimizer.accountant.get_epsilon(args.delta)
    secs = time.perf_counter() - t0
    print(f"done in {secs:.1f} s: held-out loss {start:.3f} -> {end:.3f}, ({eps:.2f}, {args.delta})-DP")
    return {"loss_before": start, "loss_after": end, "epsilon": eps, "steps": float(steps)}


if __name__ == "__main__":
    main()
