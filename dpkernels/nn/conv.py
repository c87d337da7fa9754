from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..functional._common import autocast_inputs
from ..functional.conv import ConvFunction
from ._base import DPModule


class _DPConvNd(DPModule):
    """The DP forward shared by DPConv1d/2d/3d: pad as torch does, then the ConvFunction.

    Padding modes other than "zeros" pad the input outside the Function (F.pad, as torch's conv);
    padding="same" with an even total padding d * (k - 1) pads zeros symmetrically inside the
    conv, otherwise (odd total) the one extra zero on the right is padded first, as ATen does.
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: str | tuple[int, ...]
    padding_mode: Literal["zeros", "reflect", "replicate", "circular"]
    groups: int
    weight: Tensor
    bias: Tensor | None
    _reversed_padding_repeated_twice: list[int]

    def _dp_pad(self, input: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """The input as the Function sees it and the zero padding left to the conv."""
        n = len(self.kernel_size)
        if self.padding_mode != "zeros":
            x = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return x, (0,) * n
        if self.padding == "valid":
            return input, (0,) * n
        if self.padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            left = tuple(t // 2 for t in total)
            extra = [t - 2 * (t // 2) for t in total]  # right pad - left pad, 0 or 1
            if any(extra):
                input = F.pad(input, [q for e in reversed(extra) for q in (0, e)])
            return input, left
        assert not isinstance(self.padding, str)
        return input, tuple(self.padding)

    def forward(self, input: Tensor) -> Tensor:
        n = len(self.kernel_size)
        if input.dim() != n + 2 and self._dp_training():
            raise ValueError(
                f"{type(self).__name__} under DP training needs a batched input (B, C, {n} spatial dims) to have "
                f"per-sample gradients, got shape {tuple(input.shape)}; add the batch dimension "
                f"(input.unsqueeze(0))"
            )
        if not self._dp_active():
            return super().forward(input)  # type: ignore[misc]
        padded, padding = self._dp_pad(input)
        (x, w, b), ctx = autocast_inputs(padded, self.weight, self.bias)
        with ctx:
            return ConvFunction.apply(x, w, b, self, tuple(self.stride), padding, tuple(self.dilation), self.groups)


class DPConv1d(_DPConvNd, nn.Conv1d):
    """nn.Conv1d whose per-sample gradient norms come from the ghost-norm or instantiation rule on unfold(x)."""

    torch_layer = nn.Conv1d
    dp_function = ConvFunction


class DPConv2d(_DPConvNd, nn.Conv2d):
    """nn.Conv2d whose per-sample gradient norms come from the ghost-norm or instantiation rule on unfold(x)."""

    torch_layer = nn.Conv2d
    dp_function = ConvFunction


class DPConv3d(_DPConvNd, nn.Conv3d):
    """nn.Conv3d whose per-sample gradient norms come from the ghost-norm or instantiation rule on unfold(x)."""

    torch_layer = nn.Conv3d
    dp_function = ConvFunction
