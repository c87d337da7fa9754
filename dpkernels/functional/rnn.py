"""Recurrent layers (nn.RNN, nn.LSTM, nn.GRU): per-sample gradients of the recurrent weights.

One layer and direction, with inputs x_t and hidden states h_t (batch first, t = 0..T-1):

    gi_t = W_ih x_t + b_ih,   gh_t = W_hh h_{t-1} + b_hh     (gate pre-activations)
    LSTM with proj_size:      h_t = W_hr m_t,  m_t = o_t * tanh(c_t)

Sample i's gradients are sums over time of outer products, i.e. a Linear layer's per-sample
gradients with the time steps as its T positions:

    dW_ih = sum_t G^ih_t x_t^T       db_ih = sum_t G^ih_t
    dW_hh = sum_t G^hh_t h_{t-1}^T   db_hh = sum_t G^hh_t
    dW_hr = sum_t G^hr_t m_t^T

with G^ih_t = dL/dgi_t, G^hh_t = dL/dgh_t, G^hr_t = dL/dh_t (through the projection). For RNN and
LSTM gi_t + gh_t enter the cell together, so G^hh = G^ih; for GRU the n gate's hidden part is
gated, n_t = tanh(gi_n + r_t * gh_n), and G^hh differs from G^ih there. Norms and clipped sums are
the Linear ops (``ops.linear_norms``, ``ops.linear_clipped_sum``, the bias ops) on the (B, T, .)
stacks: ghost norm or instantiation by the FLOP rule, the fused noise epilogue. A layer called
several times in one pass concatenates its calls along T (the norm of the summed gradient).

How the stacks reach the engine: `RNNFunction` computes gi for the whole sequence in one matmul
and outputs, next to it, the tensors the recurrence adds its hidden-side terms to: b_hh broadcast
over time for GRU (whose gradient is G^hh), zeros for the projection (whose gradient is G^hr).
The recurrence runs with the weights detached, so autograd computes no gradient for any of them;
the Function's backward receives the three stacks whole, whatever order the steps ran in, and
hands them to the engine as one use with the stacks of h_{t-1} and m_t recorded in forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ._common import attach, first_order_only, trainable
from .linear import fused_linear_sum

CELLS = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")
_KINDS = ("ih", "hh", "hr")


@dataclass
class Record:
    """What one layer-direction's forward leaves for its backward: detached (B, T, .) stacks of h_{t-1}
    (``hprev``) and, for LSTM with proj_size, of m_t (``m``)."""

    layer: int
    suffix: str  # "" or "_reverse", as in the parameter names
    hprev: Tensor | None = None
    m: Tensor | None = None


@dataclass
class RNNUse:
    """One call's saved tensors and the gradient stacks of its gate pre-activations (all (B, T, .))."""

    layer: int
    suffix: str
    x: Tensor
    hprev: Tensor
    g_hh: Tensor
    m: Tensor | None
    g_hr: Tensor | None


def param_names(layer: int, suffix: str) -> dict[str, str]:
    """Parameter names of one layer-direction, keyed weight/bias x ih/hh, and w_hr."""
    s = f"_l{layer}{suffix}"
    return {
        "w_ih": f"weight_ih{s}",
        "b_ih": f"bias_ih{s}",
        "w_hh": f"weight_hh{s}",
        "b_hh": f"bias_hh{s}",
        "w_hr": f"weight_hr{s}",
    }


class RNNFunction(torch.autograd.Function):
    """gi = x W_ih^T + b_ih (+ b_hh for RNN/LSTM), and for GRU bh = b_hh over (B, T), for proj zr = 0.

    Outputs (gi, [bh], [zr]); backward returns grad_input x only and reports
    (RNNUse, G^ih) to the engine, which computes every parameter's clipped sum.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        module: Any,
        rec: Record,
        cell: str,
        w_ih: Tensor,
        b_ih: Tensor | None,
        w_hh: Tensor,
        b_hh: Tensor | None,
        w_hr: Tensor | None,
    ):
        ctx.save_for_backward(x, w_ih)
        attach(ctx, module)
        ctx.rec = rec
        ctx.sep, ctx.proj = cell == "GRU", w_hr is not None
        gi = F.linear(x, w_ih, b_ih)
        B, T = x.shape[0], x.shape[1]
        outs = [gi]
        if ctx.sep:
            bh = b_hh.expand(B, T, -1).contiguous() if b_hh is not None else gi.new_zeros(gi.shape)
            outs.append(bh)
        elif b_hh is not None:
            gi += b_hh
        if ctx.proj:
            assert w_hr is not None
            outs.append(x.new_zeros(B, T, w_hr.shape[0]))
        return tuple(outs)

    @staticmethod
    @first_order_only
    def backward(ctx, g_ih: Tensor, *rest: Tensor):
        x, w_ih = ctx.saved_tensors
        rec = ctx.rec
        g_hh = rest[0] if ctx.sep else g_ih
        g_hr = rest[-1] if ctx.proj else None
        gx = g_ih @ w_ih.to(g_ih.dtype) if ctx.needs_input_grad[0] else None
        use = RNNUse(rec.layer, rec.suffix, x, rec.hprev, g_hh, rec.m, g_hr)
        ctx.module._dp_engine.on_backward(ctx.module, use, g_ih, ctx)
        return gx, None, None, None, None, None, None, None, None

    @staticmethod
    def _stacks(uses) -> dict[tuple[int, str], dict[str, tuple[Tensor, Tensor]]]:
        """Per layer-direction, the (A, G) pair of each of its Linear-like parts, calls concatenated along T."""
        by_key: dict[tuple[int, str], list[tuple[RNNUse, Tensor]]] = {}
        for u, g in uses:
            by_key.setdefault((u.layer, u.suffix), []).append((u, g))

        def cat(ts: list[Tensor]) -> Tensor:
            return ts[0] if len(ts) == 1 else torch.cat(ts, 1)

        out = {}
        for key, items in by_key.items():
            parts = {
                "ih": (cat([u.x for u, _ in items]), cat([g for _, g in items])),
                "hh": (cat([u.hprev for u, _ in items]), cat([u.g_hh for u, _ in items])),
            }
            ms = [u.m for u, _ in items if u.m is not None]
            ghr = [u.g_hr for u, _ in items if u.g_hr is not None]
            if ms:  # LSTM with proj_size
                parts["hr"] = (cat(ms), cat(ghr))
            out[key] = parts
        return out

    @staticmethod
    def norms(module: Any, uses) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        methods = set()
        for (layer, suffix), parts in RNNFunction._stacks(uses).items():
            names = param_names(layer, suffix)
            for kind, (a, g) in parts.items():
                w = trainable(module, names[f"w_{kind}"])
                b = trainable(module, names[f"b_{kind}"]) if kind != "hr" else None
                if w is not None:
                    method = ops.linear_norm_method(a.shape[1], a.shape[2], g.shape[2])
                    methods.add(method)
                    nw, nb = ops.certified.linear_norms(a, g, bias=b is not None, method=method)
                    out[id(w)] = nw
                elif b is not None:
                    nb = ops.certified.bias_norms(g)
                if b is not None:
                    assert nb is not None
                    out[id(b)] = nb
        module.dp_norm_method = "+".join(sorted(methods)) or "bias-only"
        return out

    @staticmethod
    def clipped_sum(module: Any, uses, specs) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        for (layer, suffix), parts in RNNFunction._stacks(uses).items():
            names = param_names(layer, suffix)
            for kind, (a, g) in parts.items():
                w = trainable(module, names[f"w_{kind}"])
                b = trainable(module, names[f"b_{kind}"]) if kind != "hr" else None
                out.update(fused_linear_sum(a, g, w, b, specs))
        for pid, spec in specs.items():  # a parameter no call reached still gets its prev and noise
            if pid not in out:
                p = next(q for q in module.parameters() if id(q) == pid)
                out[pid] = ops.add_noise(
                    spec.prev,
                    p.shape,
                    noise_std=spec.noise_std,
                    scale=spec.scale,
                    seed=spec.seed,
                    device=p.device,
                    dtype=spec.prev.dtype if spec.prev is not None else ops.acc_dtype(p),
                )
        return out


def recurrence(
    cell: str,
    gi: Tensor,
    bh: Tensor | None,
    zr: Tensor | None,
    w_hh: Tensor,
    w_hr: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    *,
    reverse: bool,
    valid: Tensor | None,
    rec: Record | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer-direction over time: (output (B, T, H_out), h_n (B, H_out), c_n (B, H) for LSTM).

    gi: (B, T, gates) input-side pre-activations (with b_hh for RNN/LSTM); bh: GRU's hidden-side
    bias over time; zr: zeros added after the projection (their gradient is G^hr). ``valid``
    (B, T) bool marks the real steps of padded sequences: elsewhere the state carries over and the
    output is zero, so a padded step's gate gradients are exactly zero. With ``rec`` the detached
    stacks of h_{t-1} and m_t are recorded for the backward.
    """
    T = gi.shape[1]
    gis = gi.unbind(1)  # unbind, not gi[:, t]: one backward node that stacks, not T zero-filled copies
    bhs = bh.unbind(1) if bh is not None else None
    zrs = zr.unbind(1) if zr is not None else None
    vs = valid.unbind(1) if valid is not None else None
    h, c = h0, c0
    outs: list[Tensor] = [h0] * T
    hprev: list[Tensor] = [h0] * T
    ms: list[Tensor] = [h0] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        hprev[t] = h
        c_new = None
        if cell == "GRU":
            gh = F.linear(h, w_hh)
            if bhs is not None:
                gh = gh + bhs[t]
            i_r, i_z, i_n = gis[t].chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h_new = n + z * (h - n)
        elif cell == "LSTM":
            gates = gis[t] + F.linear(h, w_hh)
            i, f, g, o = gates.chunk(4, 1)
            assert c is not None
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            m = torch.sigmoid(o) * torch.tanh(c_new)
            ms[t] = m
            h_new = m
            if w_hr is not None:
                h_new = F.linear(m, w_hr)
                if zrs is not None:
                    h_new = h_new + zrs[t]
        else:
            pre = gis[t] + F.linear(h, w_hh)
            h_new = torch.tanh(pre) if cell == "RNN_TANH" else torch.relu(pre)
        if vs is not None:
            v = vs[t][:, None]
            outs[t] = torch.where(v, h_new, torch.zeros_like(h_new))
            h = torch.where(v, h_new, h)
            if c_new is not None:
                assert c is not None
                c = torch.where(v, c_new, c)
        else:
            outs[t] = h = h_new
            if c_new is not None:
                c = c_new
    if rec is not None:
        rec.hprev = torch.stack([x.detach() for x in hprev], 1)
        if w_hr is not None:
            rec.m = torch.stack([x.detach() for x in ms], 1)
    return torch.stack(outs, 1), h, c
