"""The in-projection of nn.MultiheadAttention: Linear on row blocks of one packed weight.

With E = embed_dim,

    q = x_q W[0:E]^T + b[0:E],   k = x_k W[E:2E]^T + b[E:2E],   v = x_v W[2E:3E]^T + b[2E:3E]

(one matmul with all of W when query is key is value). Sample i's gradient of W is the stack of
the blocks' gradients G_s,i^T A_s,i, which touch disjoint rows, so

    ||dW_i||^2 = sum_s ||G_s,i^T A_s,i||^2          (each by ghost norm or instantiation)
    sum_i c_i dW_i = stack_s sum_i c_i G_s,i^T A_s,i

and the same for the bias with sum_t g_t. When one block covers the whole packed weight (self-attention)
the clipped sum is the Linear layer's fused one: clip factors, prev, noise and scale in one op.
Separate q/k/v weights (kdim or vdim != embed_dim) are three Linear layers sharing the packed bias.
The learned key/value biases of ``add_bias_kv`` arrive as (name, G) uses from `TapFunction`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ._common import attach, batch_rows, first_order_only, trainable
from .linear import fused_linear_sum
from .tap import raw_clipped_sum, raw_norms

# Rows of the packed in_proj_weight each projection tag covers, in units of embed_dim.
_ROWS = {"qkv": (0, 3), "q": (0, 1), "kv": (1, 3), "k": (1, 2), "v": (2, 3)}
_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")


class MHAFunction(torch.autograd.Function):
    """One in-projection y = x W_s^T + b_s; backward reports ((tag, x), G) to the engine.

    ``norms`` and ``clipped_sum`` serve the whole module: projection uses and the (name, G) uses of
    ``bias_k``/``bias_v`` reported by TapFunction.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, module: Any, tag: str) -> Tensor:
        ctx.save_for_backward(x, weight)
        attach(ctx, module)
        ctx.tag = tag
        return F.linear(x, weight, bias)

    @staticmethod
    @first_order_only
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        gx = g @ weight.to(g.dtype) if ctx.needs_input_grad[0] else None
        ctx.module._dp_engine.on_backward(ctx.module, (ctx.tag, x), g, ctx)
        return gx, None, None, None, None

    @staticmethod
    def _blocks(module: Any, uses) -> list[tuple[int, int, Tensor, Tensor]]:
        """Projection uses as (first row block, end row block, A (B, T, d), G (B, T, p)), uses of the same rows
        concatenated along T. Uses of one tag stay whole; mixed tags are split into the q, k, v blocks."""
        by_tag: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for saved, g in uses:
            if isinstance(saved, tuple):
                by_tag.setdefault(saved[0], []).append((batch_rows(saved[1]), batch_rows(g)))
        if len(by_tag) > 1:
            E = module.embed_dim
            split: dict[str, list[tuple[Tensor, Tensor]]] = {}
            for tag, pairs in by_tag.items():
                r0, r1 = _ROWS[tag]
                for blk in range(r0, r1):
                    key = "qkv"[blk]
                    lo = (blk - r0) * E
                    split.setdefault(key, []).extend((a, g[..., lo : lo + E]) for a, g in pairs)
            by_tag = split
        out = []
        for tag, pairs in by_tag.items():
            a = torch.cat([a for a, _ in pairs], 1) if len(pairs) > 1 else pairs[0][0]
            g = torch.cat([g for _, g in pairs], 1) if len(pairs) > 1 else pairs[0][1]
            out.append((*_ROWS[tag], a, g))
        return out

    @staticmethod
    def _weights(module: Any, r0: int) -> Tensor | None:
        """The trainable weight a block starting at row block r0 belongs to (packed: in_proj_weight)."""
        if module._qkv_same_embed_dim:
            return trainable(module, "in_proj_weight")
        return trainable(module, _SEPARATE[r0])

    @staticmethod
    def _raw(uses) -> dict[str, list[Tensor]]:
        out: dict[str, list[Tensor]] = {}
        for saved, g in uses:
            if isinstance(saved, str):
                out.setdefault(saved, []).append(g)
        return out

    @staticmethod
    def norms(module: Any, uses) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        b = trainable(module, "in_proj_bias")
        methods = []
        for r0, _, a, g in MHAFunction._blocks(module, uses):
            w = MHAFunction._weights(module, r0)
            if w is not None:
                method = ops.linear_norm_method(a.shape[1], a.shape[2], g.shape[2])
                methods.append(method)
                nw, nb = ops.certified.linear_norms(a, g, bias=b is not None, method=method)
                out[id(w)] = out[id(w)] + nw if id(w) in out else nw
            elif b is not None:
                nb = ops.certified.bias_norms(g)
            if b is not None:
                assert nb is not None
                out[id(b)] = out[id(b)] + nb if id(b) in out else nb
        module.dp_norm_method = "+".join(sorted(set(methods))) or "bias-only"
        for name, gs in MHAFunction._raw(uses).items():
            p = trainable(module, name)
            if p is not None:
                out[id(p)] = raw_norms(gs)
        return out

    @staticmethod
    def clipped_sum(module: Any, uses, specs) -> dict[int, Tensor]:
        b = trainable(module, "in_proj_bias")
        sb = specs.get(id(b)) if b is not None else None
        blocks = MHAFunction._blocks(module, uses)
        if module._qkv_same_embed_dim and len(blocks) == 1 and blocks[0][:2] == (0, 3):
            # self-attention: one block covers the packed weight and bias, so the Linear layer's fused
            # clipped sum (prev, noise and scale in its epilogue) serves them
            _, _, a, g = blocks[0]
            out = fused_linear_sum(a, g, trainable(module, "in_proj_weight"), b, specs)
        else:
            out = MHAFunction._blockwise_sum(module, blocks, b, sb, specs)
        for name, gs in MHAFunction._raw(uses).items():
            p = trainable(module, name)
            spec = specs.get(id(p)) if p is not None else None
            if p is not None and spec is not None:
                out[id(p)] = raw_clipped_sum(gs, spec, p.shape)
        return out

    @staticmethod
    def _blockwise_sum(module: Any, blocks, b: Tensor | None, sb, specs) -> dict[int, Tensor]:
        """Raw clipped sums per row block into each parameter's rows, then prev, noise and scale once."""
        E = module.embed_dim
        totals: dict[int, Tensor] = {}  # raw sums sum_i c_i g_i, noise and scale added once at the end
        for r0, r1, a, g in blocks:
            w = MHAFunction._weights(module, r0)
            sw = specs.get(id(w)) if w is not None else None
            if w is not None and sw is not None:
                rw, _ = ops.linear_clipped_sum(a, g, sw.c, bias=False)
                if module._qkv_same_embed_dim:
                    tw = totals.setdefault(id(w), torch.zeros(w.shape, dtype=rw.dtype, device=rw.device))
                    tw[r0 * E : r1 * E] += rw
                else:
                    totals[id(w)] = rw
            if b is not None and sb is not None:
                rb = ops.bias_clipped_sum(g, sb.c)
                tb = totals.setdefault(id(b), torch.zeros(b.shape, dtype=rb.dtype, device=rb.device))
                tb[r0 * E : r1 * E] += rb
        out: dict[int, Tensor] = {}
        for name in (*_SEPARATE, "in_proj_weight", "in_proj_bias"):
            p = trainable(module, name)
            spec = specs.get(id(p)) if p is not None else None
            if p is None or spec is None:
                continue
            # A parameter no use reached (a projection never called) still gets its prev and noise.
            total = totals.get(id(p))
            if total is None:
                total = torch.zeros(p.shape, dtype=ops.acc_dtype(p), device=p.device)
            if spec.prev is not None:
                total = total + spec.prev.to(total.dtype)
            out[id(p)] = ops.add_noise(
                total,
                p.shape,
                noise_std=spec.noise_std,
                scale=spec.scale,
                seed=spec.seed,
                device=p.device,
                dtype=total.dtype,
            )
        return out
