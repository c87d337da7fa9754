"""nn.MultiheadAttention with exact per-sample gradients of its packed in-projection.

The in-projection runs through `dpkernels.functional.mha.MHAFunction` (its formulas are there); the
learned key/value biases of ``add_bias_kv`` are (1, 1, E) parameters broadcast over the batch, expanded
to (B, 1, E) through `TapFunction` so their per-sample gradients arrive whole; ``out_proj`` becomes a
DPLinear called as a module.

The attention itself is torch's F.multi_head_attention_forward re-laid out batch first (the engine
needs the batch as dim 0): inputs (L, B, E) with ``batch_first=False`` are transposed in and out.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional._common import autocast_inputs
from ..functional.mha import _ROWS, _SEPARATE, MHAFunction
from ..functional.tap import TapFunction
from ._base import DPModule, make_twin
from .linear import DPLinear


def _dp_linear(linear: nn.Linear) -> DPLinear:
    """A DPLinear sharing ``linear``'s parameters (out_proj is a Linear subclass: DPLinear.from_module refuses it)."""
    return make_twin(linear, DPLinear)


class DPMultiheadAttention(DPModule, nn.MultiheadAttention):
    """nn.MultiheadAttention whose in-projection (packed or separate), ``bias_k``/``bias_v`` and out_proj
    get exact per-sample norms and clipped sums; same forward values and state_dict as torch's."""

    torch_layer = nn.MultiheadAttention
    dp_function = MHAFunction

    @classmethod
    def from_module(cls, module: nn.Module, *, in_place: bool = False) -> DPMultiheadAttention:  # type: ignore[override]
        out = module.out_proj
        if not isinstance(out, nn.Linear):
            # e.g. PEFT's LoRA on MultiheadAttention: it merges the adapters into in_proj_weight and
            # out_proj's weight for each forward, so their gradients never pass through a DP layer.
            raise ValueError(
                f"{type(module).__name__}.out_proj is a {type(out).__name__}, not a Linear: the DP twin of "
                f"MultiheadAttention needs torch's own projections (PEFT LoRA on a MultiheadAttention merges its "
                f"adapters into those weights, which per-sample clipping cannot follow). Put adapters on other "
                f"layers, or train the attention's own weights"
            )
        new = super().from_module(module, in_place=in_place)
        if not isinstance(out, DPModule):
            new.out_proj = _dp_linear(out)  # type: ignore[assignment]
        return new

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        eng = self._dp_engine if self._dp_engine is not None else getattr(self.out_proj, "_dp_engine", None)
        if eng is None or not eng.active():
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        if query.dim() != 3:
            raise ValueError(
                f"DPMultiheadAttention got an unbatched query of shape {tuple(query.shape)}: DP training needs a "
                f"batch dimension ((N, L, E) with batch_first=True, (L, N, E) otherwise); add it with unsqueeze"
            )
        for n in ("in_proj_weight", *_SEPARATE, "in_proj_bias"):
            w = getattr(self, n)
            if w is not None and w.requires_grad and not isinstance(w, nn.Parameter):
                raise ValueError(
                    f"DPMultiheadAttention.{n} is a computed tensor ({type(w).__name__} with grad_fn "
                    f"{type(w.grad_fn).__name__}), not a parameter: per-sample gradients of what it is computed "
                    f"from cannot be clipped here (adapters merged into it?). Use parameters, or put adapters elsewhere"
                )
        same_qkv = query is key and key is value
        same_kv = key is value
        if not self.batch_first:  # the engine needs the batch as dim 0 of every saved input and gradient
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        use = self._uses()
        q, k, v = self._in_projection(query, key, value, same_qkv, same_kv, use)
        kv_bias = None
        if self.bias_k is not None and self.bias_v is not None:
            kv_bias = (self._kv_bias("bias_k", q.shape[0], use), self._kv_bias("bias_v", q.shape[0], use))
        out, weights = self._attend(
            q, k, v, kv_bias, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    # ------------------------------------------------------------------ pieces of forward
    def _uses(self) -> Any:
        """A counter of per-sample uses: the first was counted by _dp_active, each later one by engine.wants."""
        active = self._dp_active()
        first = [True]

        def use() -> bool:
            if not active:
                return False
            if first[0]:
                first[0] = False
            else:
                self._dp_engine.wants(self)
            return True

        return use

    def _in_projection(
        self, query: Tensor, key: Tensor, value: Tensor, same_qkv: bool, same_kv: bool, use: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        bias = self.in_proj_bias
        if self._qkv_same_embed_dim:
            w_all = self.in_proj_weight
            if same_qkv:
                calls = [("qkv", query)]
            elif same_kv:
                calls = [("q", query), ("kv", key)]
            else:
                calls = [("q", query), ("k", key), ("v", value)]
            weights = [w_all[_ROWS[t][0] * E : _ROWS[t][1] * E] for t, _ in calls]
            trainable_proj = w_all.requires_grad
        else:
            calls = [("q", query), ("k", key), ("v", value)]
            weights = [getattr(self, n) for n in _SEPARATE]
            trainable_proj = any(w.requires_grad for w in weights)
        trainable_proj = trainable_proj or (bias is not None and bias.requires_grad)
        outs = []
        for (tag, x), w in zip(calls, weights, strict=True):
            b = bias[_ROWS[tag][0] * E : _ROWS[tag][1] * E] if bias is not None else None
            if trainable_proj and use():
                (xc, wc, bc), ctx = autocast_inputs(x, w, b)
                with ctx:
                    outs.append(MHAFunction.apply(xc, wc, bc, self, tag))
            else:
                outs.append(F.linear(x, w, b))
        if len(outs) == 1:
            q, k, v = outs[0].chunk(3, dim=-1)
        elif len(outs) == 2:
            q = outs[0]
            k, v = outs[1].chunk(2, dim=-1)
        else:
            q, k, v = outs
        return q, k, v

    def _kv_bias(self, name: str, batch: int, use: Any) -> Tensor:
        p = getattr(self, name)
        if p.requires_grad and use():
            return TapFunction.apply(p, batch, self, name)
        return p.expand(batch, *p.shape[1:])

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kv_bias: tuple[Tensor, Tensor] | None,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """F.multi_head_attention_forward after the in-projection, on (B, L, E) q and (B, S, E) k, v."""
        B, L, E = q.shape
        H = self.num_heads
        hd = E // H
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=q.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=q.dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False
        S = k.shape[1]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (L, S):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (B * H, L, S):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(B * H, L, S)}."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if kv_bias is not None:
            k = torch.cat([k, kv_bias[0].to(k.dtype)], 1)
            v = torch.cat([v, kv_bias[1].to(v.dtype)], 1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        q = q.reshape(B, L, H, hd).transpose(1, 2)
        k = k.reshape(B, k.shape[1], H, hd).transpose(1, 2)
        v = v.reshape(B, v.shape[1], H, hd).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, H, 1, hd)], 2)
            v = torch.cat([v, v.new_zeros(B, H, 1, hd)], 2)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        S = k.shape[2]
        if attn_mask is not None:  # (1, L, S) or (B*H, L, S) -> broadcastable against (B, H, L, S)
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(B, H, L, S)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, S):
                raise RuntimeError(
                    f"Expected key_padding_mask of shape {(B, S)} (with any added key/value positions), "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            kpm = key_padding_mask.view(B, 1, 1, S)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * math.sqrt(1.0 / float(hd))) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            w = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                w = F.dropout(w, p=dropout_p)
            out = (w @ v).transpose(1, 2).reshape(B, L, E)
            return out, (w.mean(dim=1) if average_attn_weights else w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        return out.transpose(1, 2).reshape(B, L, E), None
