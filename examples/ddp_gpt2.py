"""Data-parallel DP training of a small GPT-2 on torch.distributed: every rank clips its own samples,
the clipped sums are all-reduced, the noise is added once (dpkernels.distributed).

    torchrun --nproc_per_node 2 examples/ddp_gpt2.py            # CPU, gloo; a minute or two
    torchrun --nproc_per_node 2 examples/ddp_gpt2.py --quick    # a few steps
    torchrun --nproc_per_node 2 examples/ddp_gpt2.py --fsdp     # FSDP2: each block and the root fully_shard-ed

Nothing is downloaded: a Hugging Face GPT2LMHeadModel from a tiny config, trained on the bytes of
the Python standard library's own source (argparse and textwrap, read from disk), split into
windows of T bytes, one training example each. Each rank draws its Poisson batch over its shard of
the windows (`distributed_poisson_loader`), so every window is in a global step with probability q;
the loss is per sample (each window's mean token loss), and the engine divides by the global
expected batch size q N. Rank 0 prints the loss and epsilon (every rank computes the same epsilon).
On a GPU machine, set the device per rank (LOCAL_RANK) and use the nccl backend.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dpkernels
from dpkernels.distributed import distributed_poisson_loader


def corpus() -> bytes:
    import argparse as m1
    import textwrap as m2

    return "\n".join(inspect.getsource(m) for m in (m1, m2)).encode()[:200_000]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2's fully_shard (dpkernels.fsdp)")
    args = ap.parse_args(argv)
    from transformers import GPT2Config, GPT2LMHeadModel

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank (make_private also broadcasts rank 0's)
    T = 32
    ids = torch.frombuffer(bytearray(corpus()), dtype=torch.uint8).long()
    n = ids.numel() // T
    windows = ids[: n * T].view(n, T)
    data = torch.utils.data.TensorDataset(windows)
    q = 64 / n
    steps = 4 if args.quick else math.ceil(args.epochs / q)
    size = dict(n_embd=32, n_layer=1, n_head=2) if args.quick else dict(n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=T, **size))
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.fsdp:  # shard first (blocks, then the root), then the optimizer, then make_private
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model, optimizer = dpkernels.make_private(
        model, optimizer, target_epsilon=args.epsilon, target_delta=1 / n, sample_rate=q, dataset_size=n,
        steps=steps, max_grad_norm=1.0, distributed=True,
    )  # fmt: skip
    losses = []
    for step, (xb,) in enumerate(distributed_poisson_loader(data, q, steps=steps)):
        logits = model(xb).logits[:, :-1]
        per_sample = F.cross_entropy(logits.flatten(0, 1), xb[:, 1:].flatten(), reduction="none").view(len(xb), -1)
        loss = per_sample.mean(1).mean() if len(xb) else logits.sum() * 0.0
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item() if len(xb) else float("nan"))
        if rank == 0 and (step % 10 == 0 or step == steps - 1):
            print(f"step {step + 1}/{steps}  rank-0 batch {len(xb)}  loss {losses[-1]:.3f}", flush=True)
    local = [getattr(p, "to_local", p.detach)() for p in model.parameters()]
    mine = sum(t.numel() * t.element_size() for t in local) + sum(
        getattr(v, "to_local", v.detach)().numel() * v.element_size()
        for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0
    )  # fmt: skip
    if rank == 0:
        unsharded = 3 * full_bytes / 2**20  # parameters and Adam's two moments
        print(f"rank 0 holds {mine / 2**20:.2f} MiB of parameters and Adam state (unsharded: {unsharded:.2f})")
    eps = optimizer.accountant.get_epsilon(1 / n)
    every = [None] * world
    dist.all_gather_object(every, eps)
    if rank == 0:
        print(f"epsilon spent (delta = 1/N): {eps:.2f} on every rank: {len(set(every)) == 1}; world size {world}")
    return {"epsilon": eps, "losses": losses, "same_epsilon": len(set(every)) == 1}


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)
