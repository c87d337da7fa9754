"""DP training with the Hugging Face Trainer: `DPTrainer`, a Trainer subclass.

It changes what Trainer does in five places, each because the plain Trainer would break the guarantee:

- batches: Poisson samples with rate q (each example in a logical step independently with
  probability q; `dpkernels.distributed.DistributedPoissonSampler` over this rank's shard under
  torchrun), never the shuffled fixed-size batches the accountant does not count; with
  ``gradient_accumulation_steps = k`` each Poisson batch is split into k micro-batches (k independent
  draws could hold a sample twice in one step);
- the loss: per sample, l_i = the mean of sample i's own token losses (labels -100 excluded), and the
  step's loss the mean over the micro-batch; a token mean over the whole batch would weigh each sample
  by its share of the batch's tokens, so one sample's gradient would depend on the others;
- the optimizer: the one Trainer builds, wrapped by `make_private` (noise once per logical step,
  ``accumulation_steps = k``, divided by the global expected batch size q N); Trainer's own
  ``max_grad_norm`` clipping, applied after the noise, is turned off (the DP bound is ``max_grad_norm``
  of the DP arguments);
- the model is never wrapped in DistributedDataParallel: under torchrun the ranks' noised sums are
  all-reduced by the DP optimizer (`make_private(distributed=True)`);
- the logs carry ``epsilon`` beside the loss.

    trainer = DPTrainer(model=model, args=TrainingArguments(...), train_dataset=ds, data_collator=collate,
                        dp=DPArguments(target_epsilon=8, target_delta=1e-5, sample_rate=0.01))
    trainer.train()
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer

from .convert import make_private
from .data import EmptyBatchCollate
from .distributed import DistributedPoissonSampler


@dataclass
class DPArguments:
    """The DP half of the arguments: what `make_private` takes, and the Poisson sampling rate q."""

    sample_rate: float
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    target_delta: float | None = None
    max_grad_norm: float | list[float] = 1.0
    clipping: str = "abadi"
    groups: Any = "all-layer"
    strategy: str = "bk"
    accountant: str = "rdp"
    seed: int | None = None  # None: the noise seeds come from the OS (a fixed seed is for tests)
    sampler_generator: torch.Generator | None = None  # None: secret draws (a generator is for tests)
    extra: dict[str, Any] = field(default_factory=dict)  # any other make_private keyword


class _MicroBatches(Sampler[list[int]]):
    """Each Poisson batch of ``poisson`` split into ``k`` consecutive micro-batches (some may be empty)."""

    def __init__(self, poisson: Sampler[list[int]], k: int):
        self.poisson, self.k = poisson, k

    def __len__(self) -> int:
        return len(self.poisson) * self.k  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.poisson:
            for part in torch.tensor(batch, dtype=torch.long).tensor_split(self.k):
                yield part.tolist()


class _NotDataParallel(nn.Module):
    """Stands where Trainer would put DistributedDataParallel(model): the DP optimizer sums the ranks'
    noised gradients itself, and DDP's all-reduce of the (empty) autograd gradients would fight it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def causal_lm_per_sample_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) losses l_i = mean over sample i's predicted tokens (labels shifted by one, -100 ignored) of the
    cross entropy; 0 for a sample with no predicted token."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    tok = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none", ignore_index=-100)
    tok = tok.view(labels.shape)
    count = (labels != -100).sum(1)
    return tok.sum(1) / count.clamp(min=1)


class DPTrainer(Trainer):
    """A Trainer that trains privately (see the module docstring); ``dp`` holds the DP arguments."""

    def __init__(self, *args: Any, dp: DPArguments, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dp = dp
        self.dp_optimizer: Any = None
        self.args.max_grad_norm = 0.0  # Trainer's clipping of the noised sum is not the DP clip

    # --- batches
    def _world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _steps_per_epoch(self) -> int:
        return max(1, round(1 / self.dp.sample_rate))

    def get_train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("DPTrainer: training requires a train_dataset")
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: drop what the model does not take, as Trainer does
            dataset = self._remove_unused_columns(dataset, description="training")
        rank, world = self._world()
        poisson = DistributedPoissonSampler(
            len(dataset),  # type: ignore[arg-type]
            self.dp.sample_rate,
            rank=rank,
            world_size=world,
            steps=self._steps_per_epoch(),
            generator=self.dp.sampler_generator,
        )
        k = self.args.gradient_accumulation_steps
        collate = EmptyBatchCollate(dataset, self.data_collator)  # type: ignore[arg-type]
        return DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_sampler=_MicroBatches(poisson, k),
            collate_fn=collate,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    # --- optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        if self.dp_optimizer is not None:
            return self.optimizer
        base = super().create_optimizer(model)
        dp = self.dp
        n = len(self.train_dataset)  # type: ignore[arg-type]
        # the optimizer steps Trainer will take: max_steps, else epochs x the logical steps of an epoch
        steps = self.args.max_steps
        if steps <= 0:
            steps = math.ceil(self.args.num_train_epochs * self._steps_per_epoch())
        if self.model is None:
            raise ValueError("DPTrainer needs a model")
        _, world = self._world()
        _, self.dp_optimizer = make_private(
            self.model,
            base,
            noise_multiplier=dp.noise_multiplier,
            target_epsilon=dp.target_epsilon,
            target_delta=dp.target_delta,
            max_grad_norm=dp.max_grad_norm,
            sample_rate=dp.sample_rate,
            dataset_size=n,
            steps=steps if dp.target_epsilon is not None else None,
            clipping=dp.clipping,
            groups=dp.groups,
            strategy=dp.strategy,
            accumulation_steps=self.args.gradient_accumulation_steps,
            accountant=dp.accountant,
            seed=dp.seed,
            distributed=world > 1,
            **dp.extra,
        )
        self.optimizer = self.dp_optimizer
        return self.optimizer

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> nn.Module:
        if not training:
            return model
        return model if isinstance(model, _NotDataParallel) else _NotDataParallel(self.model)  # type: ignore[arg-type]

    # --- loss and backward
    def per_sample_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """(B,) per-sample losses of one micro-batch. The default: a causal language model's (labels in
        ``inputs``); override for other tasks (each l_i must depend on sample i only)."""
        if "labels" not in inputs:
            raise ValueError(
                "DPTrainer's default per-sample loss is a causal LM's and needs 'labels' in the batch; override "
                "per_sample_loss(model, inputs) -> (B,) losses for other tasks"
            )
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        return causal_lm_per_sample_loss(model(**inputs).logits, labels)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        per = self.per_sample_loss(model, inputs)
        self.dp_optimizer.backward(per)  # per-sample losses: each G row exactly sample i's; divided by q N
        loss = per.detach().sum() / max(per.shape[0], 1)
        return loss / self.args.gradient_accumulation_steps  # Trainer logs the sum over micro-batches

    # --- logs
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        acct = self.dp_optimizer.accountant if self.dp_optimizer is not None else None
        if acct is not None and self.dp.target_delta is not None and acct.steps > 0:
            logs["epsilon"] = acct.get_epsilon(self.dp.target_delta)
        super().log(logs, start_time)


__all__ = ["DPArguments", "DPTrainer", "causal_lm_per_sample_loss"]
