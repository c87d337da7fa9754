"""DP twins of Hugging Face layers that are not torch layers. Imports transformers: `dpkernels.convert`
imports this module only when it meets one of these layers (see convert.THIRD_PARTY_LAYERS)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

from ..functional._common import autocast_inputs
from ..functional.hf import Conv1DFunction, LlamaRMSNormFunction
from ._base import DPModule


class DPConv1D(DPModule, Conv1D):
    """GPT-2's Conv1D, y = x W + b with W (d_in, d_out): a Linear on W^T (ghost norm or instantiation)."""

    torch_layer = Conv1D
    dp_function = Conv1DFunction

    def forward(self, x: Tensor) -> Tensor:
        if not self._dp_active():
            return super().forward(x)
        (xc, w, b), ctx = autocast_inputs(x, self.weight, self.bias)
        assert xc is not None and w is not None
        with ctx:
            return Conv1DFunction.apply(xc, w.t(), b, self)


class DPLlamaRMSNorm(DPModule, LlamaRMSNorm):
    """LlamaRMSNorm, y = w * xhat; per-sample weight gradient sum_t xhat_t * g_t."""

    torch_layer = LlamaRMSNorm
    dp_function = LlamaRMSNormFunction

    def forward(self, hidden_states: Tensor) -> Tensor:
        if not self._dp_active():
            return super().forward(hidden_states)
        if hidden_states.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} got an input of shape {tuple(hidden_states.shape)}: DP layers need the batch "
                f"as the first dimension; add it (x.unsqueeze(0) for one sample)"
            )
        return LlamaRMSNormFunction.apply(hidden_states, self.weight, None, self)


def _source(fn: Any) -> str | None:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return None


@functools.cache
def llama_style_rmsnorm(base: type[nn.Module]) -> type[DPModule] | None:
    """The DP twin of a copy of LlamaRMSNorm (Mistral, Qwen2, ... "Copied from" it), or None.

    The twin reuses DPLlamaRMSNorm's forward and Function, which are exact only for LlamaRMSNorm's
    code: the copy's ``forward`` source must equal LlamaRMSNorm's (checked here, so a model whose
    norm drifts, e.g. to (1 + w) * xhat, is refused rather than silently mistreated).
    """
    if base is LlamaRMSNorm:
        return DPLlamaRMSNorm
    ref = _source(LlamaRMSNorm.forward)
    if ref is None or _source(base.forward) != ref:
        return None

    def __reduce_ex__(self, protocol: Any) -> Any:  # a run-time class: pickle as "remake the twin of base"
        return (_new_twin, (base,), *object.__reduce_ex__(self, protocol)[2:])

    return type(
        f"DP{base.__name__}",
        (DPModule, base),
        {
            "__module__": __name__,
            "__doc__": f"{base.__name__} (LlamaRMSNorm's code), y = w * xhat; per-sample gradient sum_t xhat_t * g_t.",
            "torch_layer": base,
            "dp_function": LlamaRMSNormFunction,
            "forward": DPLlamaRMSNorm.forward,
            "__reduce_ex__": __reduce_ex__,
        },
    )


def _new_twin(base: type[nn.Module]) -> nn.Module:
    cls = llama_style_rmsnorm(base)  # type: ignore[arg-type]
    assert cls is not None
    return cls.__new__(cls)
