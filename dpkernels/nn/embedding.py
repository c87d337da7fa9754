from __future__ import annotations

from torch import Tensor, nn

from ..functional.embedding import EmbeddingFunction, unsupported_reason
from ._base import DPModule


class DPEmbedding(DPModule, nn.Embedding):
    """nn.Embedding whose per-sample gradient norms are sum_v ||sum_{t: x_t = v} g_t||^2 (exact for
    repeated tokens) and whose clipped sum gets noise on every row of the table.

    ``scale_grad_by_freq``, ``sparse`` and ``max_norm`` are refused (see
    `functional.embedding.unsupported_reason`).

    Broadcast ids: Hugging Face passes position ids of shape (1, T) and adds the (1, T, D) result to a
    (B, T, D) tensor; autograd would then hand this layer the gradient summed over the batch. When the
    engine knows the model's batch B and the ids have batch 1 < B, they are expanded to (B, T) so that
    every sample gets its own rows (same output values, exact per-sample gradients).
    """

    torch_layer = nn.Embedding
    dp_function = EmbeddingFunction

    @classmethod
    def from_module(cls, module: nn.Module, *, in_place: bool = False):  # type: ignore[override]
        reason = unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"{module!r} cannot be made private: {reason}.")
        return super().from_module(module, in_place=in_place)

    def forward(self, input: Tensor) -> Tensor:
        if not self._dp_active():
            return super().forward(input)
        reason = unsupported_reason(self)
        if reason is not None:
            raise ValueError(f"{self._dp_name()} cannot be made private: {reason}.")
        if input.dim() == 0:
            raise ValueError(
                f"{self._dp_name()} got a 0-dimensional index: DP layers need the batch as the first dimension; "
                f"pass ids of shape (B, ...)"
            )
        batch = self._dp_engine.batch_size
        if batch is not None and input.dim() >= 2 and input.shape[0] == 1 < batch:
            input = input.expand(batch, *input.shape[1:])
        return EmbeddingFunction.apply(input, self.weight, self)
