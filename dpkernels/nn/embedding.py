from __future__ import annotations

from torch import Tensor, nn

from ..functional.embedding import EmbeddingFunction, unsupported_reason
from ..guard import model_inputs, storage_of
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

    1-D ids are one id per sample only when they are (a view of) one of the model's inputs; 1-D ids made
    inside the forward (positions ``torch.arange(T)``, broadcast over the batch) are refused, as nothing
    tells them from a batch when T equals the batch size (`dpkernels.guard`).
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
        if input.dim() == 1:
            inputs = model_inputs()
            if inputs is None or storage_of(input) not in inputs:
                raise ValueError(
                    f"{self._dp_name()} got 1-D ids of shape {tuple(input.shape)} that are not one of the model's "
                    f"inputs: 1-D ids count as one id per sample only when the model was given them (a view of an "
                    f"input counts). Ids made inside the forward, such as positions shared by every sample "
                    f"(nanoGPT's wpe(torch.arange(T))), cannot be told from a batch when T equals the batch size, and "
                    f"would be clipped per position. Pass positions with a batch dimension of 1 (pos[None], shape "
                    f"(1, T)): they are expanded to the batch, exactly; pass per-sample ids as a model input, or "
                    f"with their own dimension (ids[:, None], shape (B, 1))"
                )
        batch = self._dp_engine.batch_size
        if batch is not None and input.dim() >= 2 and input.shape[0] == 1 < batch:
            input = input.expand(batch, *input.shape[1:])
        return EmbeddingFunction.apply(input, self.weight, self)
