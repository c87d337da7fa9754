"""DPTrainer (Hugging Face Trainer subclass) on a tiny GPT-2 with LoRA, on the CPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import dpkernels  # noqa: E402
from dpkernels.distributed import DistributedPoissonSampler  # noqa: E402
from dpkernels.trainer import DPArguments, DPTrainer  # noqa: E402

N, T, V, Q = 40, 8, 32, 0.2
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0}


class Windows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, V, (N, T), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=1, n_head=2, **NO_DROPOUT)
    )
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0))
    for n, p in model.named_parameters():  # LoRA B starts at 0: give it values so every factor gets a gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _args(tmp_path, k=1, steps=3):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, gradient_accumulation_steps=k, learning_rate=0.5,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip


def _train(tmp_path, k=1, sigma=0.0, steps=3, trainer_class=DPTrainer, **dp):
    model = _model()
    trainer = trainer_class(
        model=model, args=_args(tmp_path, k, steps), train_dataset=Windows(),
        optimizers=(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5), None),
        dp=DPArguments(sample_rate=Q, noise_multiplier=sigma, target_delta=1e-3, max_grad_norm=0.05, seed=1,
                       sampler_generator=torch.Generator().manual_seed(7), **dp),
    )  # fmt: skip
    trainer.train()
    return model, trainer


def _trainable(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def test_trainer_steps_equal_the_plain_dp_loop(tmp_path):
    """Noise off: three Trainer steps equal three steps of make_private on the same Poisson batches, with the
    per-sample loss written here independently (each sample's mean token loss). fp32; the two differ only in
    the order of float32 additions, so 1e-5 relative is ~100x their rounding."""
    model, _ = _train(tmp_path)
    ref = _model()
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    ref, opt = dpkernels.make_private(
        ref, opt, noise_multiplier=0.0, max_grad_norm=0.05, sample_rate=Q, dataset_size=N, seed=1
    )
    data = Windows()
    sampler = DistributedPoissonSampler(N, Q, rank=0, world_size=1, steps=5, generator=torch.Generator().manual_seed(7))
    for _, idx in zip(range(3), sampler, strict=False):
        ids = data.ids[idx]
        logits = ref(input_ids=ids).logits
        per = torch.stack(
            [F.cross_entropy(logits[i, :-1], ids[i, 1:]) for i in range(len(idx))]
        ) if idx else logits.sum(dim=(1, 2))  # fmt: skip
        (per.sum() / max(len(idx), 1)).backward()
        opt.step()
        opt.zero_grad()
    moved = (_trainable(model) - _trainable(_model())).norm()
    assert moved > 1e-3
    torch.testing.assert_close(_trainable(model), _trainable(ref), rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_splits_one_poisson_batch(tmp_path):
    """gradient_accumulation_steps=2 splits each Poisson batch in two micro-batches with one noise: noise off,
    the same parameters as without accumulation (fp32 rounding only, as above)."""
    one, _ = _train(tmp_path / "a", k=1)
    two, _ = _train(tmp_path / "b", k=2)
    torch.testing.assert_close(_trainable(one), _trainable(two), rtol=1e-5, atol=1e-7)


class _Bf16Trainer(DPTrainer):
    """Forward under bf16 autocast: every DP layer of the LoRA adapters gets bfloat16 output gradients."""

    def per_sample_loss(self, model, inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().per_sample_loss(model, inputs)


def test_trainer_trains_with_16bit_output_gradients(tmp_path, monkeypatch):
    """DPTrainer hands the per-sample losses to the DP optimizer, so a forward in 16 bits trains (a scalar mean
    loss would be refused there: tests/engine/test_amp.py), close to the float32 run: bf16 keeps 8 bits
    (2^-8 = 0.4% per rounding), a few roundings per value over 3 steps stay far below the 10% of the float32
    run's movement allowed here, while a wrongly scaled step (a 1/B left in) moves by O(1) of it."""
    seen = []
    on_backward = dpkernels.engine.Engine.on_backward

    def record(self, module, saved, g, node=None):
        seen.append(g.dtype)
        return on_backward(self, module, saved, g, node)

    monkeypatch.setattr(dpkernels.engine.Engine, "on_backward", record)
    bf16, _ = _train(tmp_path / "bf16", trainer_class=_Bf16Trainer)
    assert torch.bfloat16 in seen
    fp32, _ = _train(tmp_path / "fp32")
    start = _trainable(_model())
    moved = (_trainable(fp32) - start).norm()
    assert moved > 1e-3 and float((_trainable(bf16) - _trainable(fp32)).norm()) <= 0.1 * float(moved)


def test_epsilon_is_logged_beside_the_loss(tmp_path):
    _, trainer = _train(tmp_path, sigma=1.0)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all("epsilon" in h for h in logged)
    eps = [h["epsilon"] for h in logged]
    assert eps == sorted(eps) and eps[0] > 0
    want = dpkernels.accounting.get_epsilon(1.0, Q, 3, 1e-3)
    assert math.isclose(eps[-1], want, rel_tol=1e-9)


def test_trainer_clipping_is_off_and_the_model_is_not_wrapped(tmp_path):
    """Trainer's max_grad_norm would clip the noised sum (post-processing, but not the DP bound the user set)."""
    _, trainer = _train(tmp_path, steps=1)
    assert trainer.args.max_grad_norm == 0.0
    assert not isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)


def test_a_task_without_labels_asks_for_a_per_sample_loss(tmp_path):
    model = _model()
    data = [{"input_ids": torch.zeros(T, dtype=torch.long)}] * N
    trainer = DPTrainer(
        model=model, args=_args(tmp_path, steps=1), train_dataset=data,
        dp=DPArguments(sample_rate=0.5, noise_multiplier=1.0, sampler_generator=torch.Generator().manual_seed(0)),
    )  # fmt: skip
    with pytest.raises(ValueError, match="per_sample_loss"):
        trainer.train()


def test_copy_of_arguments_is_independent():
    a = DPArguments(sample_rate=0.1)
    b = copy.deepcopy(a)
    b.extra["x"] = 1
    assert a.extra == {}


def test_target_epsilon_is_spent_by_the_last_step(tmp_path):
    """sigma is calibrated for the optimizer steps Trainer takes (max_steps), so the last log reports the target
    (dp-accounting's solver stops within ~1% below it)."""
    model = _model()
    trainer = DPTrainer(
        model=model, args=_args(tmp_path, steps=4), train_dataset=Windows(),
        dp=DPArguments(sample_rate=Q, target_epsilon=5.0, target_delta=1e-3,
                       sampler_generator=torch.Generator().manual_seed(0)),
    )  # fmt: skip
    trainer.train()
    eps = [h["epsilon"] for h in trainer.state.log_history if "loss" in h]
    assert len(eps) == 4 and 4.9 <= eps[-1] <= 5.0 + 1e-6


@pytest.mark.slow  # two processes importing transformers and peft: ~2 min on 2 cores
def test_trainer_under_torchrun(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), str(root / "examples" / "hf_trainer_dp.py"), "--steps", "4",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = [line for line in run.stdout.splitlines() if line.startswith("{'epsilon'")]
    assert len(results) == 2 and results[0] == results[1]  # every rank the same epsilon (and loss log)
