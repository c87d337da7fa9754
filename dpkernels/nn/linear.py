from __future__ import annotations

from torch import Tensor, nn

from ..functional._common import autocast_inputs
from ..functional.linear import LinearFunction
from ._base import DPModule


class DPLinear(DPModule, nn.Linear):
    """nn.Linear whose per-sample gradient norms come from the ghost-norm or instantiation rule."""

    torch_layer = nn.Linear
    dp_function = LinearFunction

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 and self._dp_training():
            raise ValueError(
                f"{self._dp_name()} got an input of shape {tuple(input.shape)}: DP layers need the batch as the "
                f"first dimension; pass (B, ..., {self.in_features})"
            )
        if not self._dp_active():
            return super().forward(input)
        (x, w, b), ctx = autocast_inputs(input, self.weight, self.bias)
        with ctx:
            return LinearFunction.apply(x, w, b, self)
