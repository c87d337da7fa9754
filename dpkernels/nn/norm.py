from __future__ import annotations

from torch import Tensor, nn

from ..functional.norm import GroupNormFunction, LayerNormFunction, RMSNormFunction
from ._base import DPModule


def _check_batched(module: DPModule, input: Tensor, min_dim: int, what: str) -> None:
    if input.dim() < min_dim:
        raise ValueError(
            f"{type(module).__name__} got an input of shape {tuple(input.shape)}: {what}. DP layers need the batch "
            f"as the first dimension; add it (x.unsqueeze(0) for one sample)"
        )


class DPLayerNorm(DPModule, nn.LayerNorm):
    """nn.LayerNorm whose affine per-sample gradients are sum_t xhat_t * g_t and sum_t g_t."""

    torch_layer = nn.LayerNorm
    dp_function = LayerNormFunction

    def forward(self, input: Tensor) -> Tensor:
        if not self._dp_active():
            return super().forward(input)
        k = len(self.normalized_shape)
        _check_batched(self, input, k + 1, f"no dimension before normalized_shape {tuple(self.normalized_shape)}")
        return LayerNormFunction.apply(input, self.weight, self.bias, self)


class DPRMSNorm(DPModule, nn.RMSNorm):
    """nn.RMSNorm whose per-sample weight gradient is sum_t xhat_t * g_t (xhat = x / rms(x))."""

    torch_layer = nn.RMSNorm
    dp_function = RMSNormFunction

    def forward(self, input: Tensor) -> Tensor:
        if not self._dp_active():
            return super().forward(input)
        k = len(self.normalized_shape)
        _check_batched(self, input, k + 1, f"no dimension before normalized_shape {tuple(self.normalized_shape)}")
        return RMSNormFunction.apply(input, self.weight, None, self)


class DPGroupNorm(DPModule, nn.GroupNorm):
    """nn.GroupNorm (any spatial rank) whose affine per-sample gradients are sums over spatial positions."""

    torch_layer = nn.GroupNorm
    dp_function = GroupNormFunction

    def forward(self, input: Tensor) -> Tensor:
        if not self._dp_active():
            return super().forward(input)
        _check_batched(self, input, 2, "GroupNorm needs (N, C, *)")
        return GroupNormFunction.apply(input, self.weight, self.bias, self)
