"""DP fine-tuning with the Hugging Face Trainer: `dpkernels.trainer.DPTrainer` on a tiny GPT-2 with LoRA.

    python examples/hf_trainer_dp.py                            # one process
    torchrun --nproc_per_node 2 examples/hf_trainer_dp.py       # two (CPU, gloo)

Nothing is downloaded: the model comes from a tiny config, the text is the Python standard library's
own source (textwrap, read from disk), cut into windows of T bytes. DPTrainer draws Poisson batches
(over each rank's shard under torchrun), computes each window's own loss, adds the noise once per
logical step (also with gradient_accumulation_steps > 1) and logs epsilon beside the loss.
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import textwrap

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from dpkernels.trainer import DPArguments, DPTrainer


class Windows(torch.utils.data.Dataset):
    def __init__(self, T: int):
        ids = torch.frombuffer(bytearray(inspect.getsource(textwrap).encode()), dtype=torch.uint8).long()
        self.ids = ids[: ids.numel() // T * T].view(-1, T)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--accumulation", type=int, default=2)
    ap.add_argument("--epsilon", type=float, default=8.0)
    args = ap.parse_args(argv)
    T = 32
    data = Windows(T)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=T, n_embd=32, n_layer=2, n_head=2))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn", "c_proj"], lora_dropout=0.0))
    trainer = DPTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=tempfile.mkdtemp(), max_steps=args.steps, gradient_accumulation_steps=args.accumulation,
            learning_rate=5e-3, logging_steps=max(1, args.steps // 4), save_strategy="no", report_to=[], use_cpu=True,
            remove_unused_columns=False, disable_tqdm=True,
        ),
        train_dataset=data,
        dp=DPArguments(sample_rate=32 / len(data), target_epsilon=args.epsilon, target_delta=1 / len(data)),
    )  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"epsilon": logs[-1]["epsilon"], "loss": [h["loss"] for h in logs]}


if __name__ == "__main__":
    print(main())
