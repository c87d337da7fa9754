"""nn.RNN (tanh, relu), nn.LSTM (with proj_size) and nn.GRU with exact per-sample gradients.

The DP forward runs the recurrence with torch ops, batch first inside whatever ``batch_first``
says (the batch is dim 0 of every saved input and gradient by construction), one `RNNFunction`
per layer and direction (see dpkernels.functional.rnn for the formulas). Packed sequences are
handled exactly: unpacked to (B, T, .) with each sample's length, a padded step changes no state
and gets a zero gradient. Dropout between layers is drawn on the (T, B, .) layout torch's own
layers use. Without DP training (no engine, eval under no_grad) the forward is torch's own.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..functional.rnn import Record, RNNFunction, param_names, recurrence
from ._base import DPModule


class _DPRNNBase(DPModule):
    """The DP forward shared by DPRNN, DPLSTM and DPGRU (mixed in before the torch class)."""

    dp_function = RNNFunction
    # set by nn.RNNBase
    mode: str
    input_size: int
    num_layers: int
    bidirectional: bool
    batch_first: bool
    hidden_size: int
    proj_size: int
    dropout: float
    _flat_weights: list
    check_forward_args: Any

    @classmethod
    def from_module(cls, module: nn.Module, *, in_place: bool = False) -> Any:  # type: ignore[override]
        new = super().from_module(module, in_place=in_place)
        if not in_place:  # torch keeps the weights in a list it updates in place on assignment: not shared
            new._flat_weights = list(module._flat_weights)  # type: ignore[arg-type]
        return new

    def forward(self, input: Any, hx: Any = None) -> Any:
        if not self._dp_training():
            return super().forward(input, hx)  # type: ignore[misc]
        return self._dp_forward(input, hx)

    def _dp_forward(self, input: Any, hx: Any) -> Any:
        is_lstm = self.mode == "LSTM"
        D = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        if packed:
            batch_sizes, B = input.batch_sizes, int(input.batch_sizes[0])
        elif isinstance(input, Tensor) and input.dim() == 3:
            batch_sizes, B = None, input.shape[0 if self.batch_first else 1]
        else:
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(
                f"{self._dp_name()} got an input of shape {shape}: DP training needs a batch "
                f"((B, T, {self.input_size}) with batch_first=True, (T, B, {self.input_size}) otherwise) "
                f"or a PackedSequence; add the batch dimension with unsqueeze"
            )
        if hx is None:
            ref = input.data if packed else input
            h_out = self.proj_size if self.proj_size > 0 else self.hidden_size
            h0 = ref.new_zeros(self.num_layers * D, B, h_out)
            hx = (h0, ref.new_zeros(self.num_layers * D, B, self.hidden_size)) if is_lstm else h0
        self.check_forward_args(input.data if packed else input, hx, batch_sizes)
        h0, c0 = hx if is_lstm else (hx, None)
        if packed:
            x, lengths = pad_packed_sequence(input, batch_first=True)  # original batch order, as hx
            valid = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(x.device)  # (B, T) real steps
        else:
            x, valid = (input if self.batch_first else input.transpose(0, 1)), None
        cast = _autocast_dtype(x)
        ctx = torch.autocast(x.device.type, enabled=False) if cast is not None else nullcontext()
        if cast is not None:
            x, h0, c0 = x.to(cast), h0.to(cast), (c0.to(cast) if c0 is not None else None)
        with ctx:
            out, h_n, c_n = self._layers(x, h0, c0, valid, cast)
        hidden = (h_n, c_n) if is_lstm else h_n
        if packed:
            return _pack_like(out, input), hidden
        return (out if self.batch_first else out.transpose(0, 1)), hidden

    def _layers(
        self, x: Tensor, h0: Tensor, c0: Tensor | None, valid: Tensor | None, cast: torch.dtype | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        D = 2 if self.bidirectional else 1
        hs, cs = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                k = layer * D + d
                h, hn, cn = self._direction(
                    x, layer, "_reverse" if d else "", h0[k], c0[k] if c0 is not None else None, valid, cast
                )
                outs.append(h)
                hs.append(hn)
                if cn is not None:
                    cs.append(cn)
            x = outs[0] if D == 1 else torch.cat(outs, -1)
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                # on the (T, B, .) layout torch's layers draw their mask on (same mask for the same seed, CPU)
                x = F.dropout(x.transpose(0, 1).contiguous(), self.dropout, training=True).transpose(0, 1)
        return x, torch.stack(hs), (torch.stack(cs) if cs else None)

    def _direction(
        self,
        x: Tensor,
        layer: int,
        suffix: str,
        h0: Tensor,
        c0: Tensor | None,
        valid: Tensor | None,
        cast: torch.dtype | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        names = param_names(layer, suffix)
        p = {k: _cast(getattr(self, n, None), cast) for k, n in names.items()}
        cell = self.mode
        assert p["w_ih"] is not None and p["w_hh"] is not None
        private = any(q is not None and q.requires_grad for q in p.values())
        if private and self._dp_active():  # one use with the engine per layer-direction call
            rec = Record(layer, suffix)
            outs = RNNFunction.apply(x, self, rec, cell, p["w_ih"], p["b_ih"], p["w_hh"], p["b_hh"], p["w_hr"])
            gi = outs[0]
            bh = outs[1] if cell == "GRU" else None
            zr = outs[-1] if p["w_hr"] is not None else None
            # detached: the Function's backward gives the engine these weights' per-sample gradients
            w_hh, w_hr = p["w_hh"].detach(), (p["w_hr"].detach() if p["w_hr"] is not None else None)
        else:
            rec, zr, w_hh, w_hr = None, None, p["w_hh"], p["w_hr"]
            gi = F.linear(x, p["w_ih"], p["b_ih"])
            bh = None
            if cell == "GRU" and p["b_hh"] is not None:
                bh = p["b_hh"].expand(gi.shape)
            elif p["b_hh"] is not None:
                gi = gi + p["b_hh"]
        return recurrence(cell, gi, bh, zr, w_hh, w_hr, h0, c0, reverse=bool(suffix), valid=valid, rec=rec)


def _cast(p: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return p.to(dtype) if p is not None and dtype is not None else p


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype when autocast is on: the DP forward then runs every tensor in it (as torch's
    RNN kernels do under autocast), with autocast off inside."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _pack_like(out: Tensor, like: PackedSequence) -> PackedSequence:
    """(B, T, .) batch-first padded output in the original batch order -> the packing of ``like``."""
    B = out.shape[0]
    order = like.sorted_indices
    srt = out[order] if order is not None else out  # sorted by decreasing length, as packed data runs
    bs = like.batch_sizes
    mask = torch.arange(B)[None, :] < bs[:, None]  # (T, B): time-major, then batch, the packed order
    data = srt.transpose(0, 1)[mask.to(out.device)]
    return PackedSequence(data, bs, like.sorted_indices, like.unsorted_indices)


class DPRNN(_DPRNNBase, nn.RNN):
    """nn.RNN (tanh or relu) with exact per-sample norms of its weights and biases; same state_dict and outputs."""

    torch_layer = nn.RNN


class DPLSTM(_DPRNNBase, nn.LSTM):
    """nn.LSTM (proj_size too) with exact per-sample norms of its weights and biases; same state_dict and outputs."""

    torch_layer = nn.LSTM


class DPGRU(_DPRNNBase, nn.GRU):
    """nn.GRU with exact per-sample norms of its weights and biases; same state_dict and outputs."""

    torch_layer = nn.GRU
