"""Reference Conv1d/2d/3d ops (plain PyTorch): the Linear formulas on the unfolded input.

A convolution with C_in input channels, C_out output channels, ``groups`` groups and kernel k is,
per group j and sample i, a Linear layer on the unfolded input:

    A_ij: (T, d)  with T = output positions, d = C_in/groups * prod(k)
    G_ij: (T, p)  the output gradient of group j's channels, p = C_out/groups
    per-sample weight gradient of group j: G_ij^T A_ij   (p, d)

so ||grad_i W||^2 = sum_j ||G_ij^T A_ij||_F^2, each term by ghost norm or instantiation
(see linear.linear_norms), and the bias gradient is sum_t g_it as for Linear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import _chunks, acc_dtype, finish, kept
from .linear import bias_clipped_sum, bias_norms, linear_norms

IntOrSeq = int | Sequence[int]


def _ntuple(v: IntOrSeq, n: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    t = tuple(int(e) for e in v)
    if len(t) == 1:
        return t * n
    if len(t) != n:
        raise ValueError(f"conv: {name} must be an int or {n} ints for a {n}-d convolution, got {tuple(v)}")
    return t


def conv_unfold(x: Tensor, kernel_size: IntOrSeq, stride: IntOrSeq, padding: IntOrSeq, dilation: IntOrSeq) -> Tensor:
    """N-d unfold (im2col) for 1, 2 or 3 spatial dims, with zero padding, stride and dilation.

    x: (B, C, *S) -> (B, T, C * prod(k)), T = prod of the output sizes, columns ordered (c, k_1, ..., k_n)
    (the layout of a conv weight (C_out, C, *k) flattened); row t of sample i is the input patch that
    output position t sees. Built from strided views (Tensor.unfold); one copy, at the final reshape.
    """
    n = x.dim() - 2
    if n < 1:
        raise ValueError(f"conv_unfold: x must be (B, C, *spatial) with at least one spatial dim, got {tuple(x.shape)}")
    k = _ntuple(kernel_size, n, "kernel_size")
    s = _ntuple(stride, n, "stride")
    pad = _ntuple(padding, n, "padding")
    dil = _ntuple(dilation, n, "dilation")
    if any(pad):
        x = F.pad(x, [q for pq in reversed(pad) for q in (pq, pq)])
    for i in range(n):
        span = dil[i] * (k[i] - 1) + 1
        if x.shape[2 + i] < span:
            raise ValueError(
                f"conv_unfold: spatial dim {i} has size {x.shape[2 + i]} after padding, smaller than the "
                f"dilated kernel ({span}); pad the input or use a smaller kernel/dilation"
            )
        x = x.unfold(2 + i, span, s[i])  # appends the window as the last dim
        if dil[i] > 1:
            x = x[..., :: dil[i]]
    # x: (B, C, L_1..L_n, k_1..k_n) -> (B, L_1..L_n, C, k_1..k_n)
    B, C = x.shape[0], x.shape[1]
    out_sizes = x.shape[2 : 2 + n]
    x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
    return x.reshape(B, math.prod(out_sizes), C * math.prod(k))


def conv_rows(
    x: Tensor,
    g: Tensor,
    *,
    kernel_size: IntOrSeq,
    stride: IntOrSeq,
    padding: IntOrSeq,
    dilation: IntOrSeq,
    groups: int,
) -> tuple[Tensor, Tensor]:
    """The Linear view of a conv, one row block per (sample, group).

    x: (B, C_in, *S), g: (B, C_out, *out) -> a: (B * groups, T, C_in/groups * prod(k)),
    g: (B * groups, T, C_out/groups); row block i * groups + j is sample i's group j.
    """
    B, C_in = x.shape[0], x.shape[1]
    C_out = g.shape[1]
    if C_in % groups or C_out % groups:
        raise ValueError(f"conv: groups={groups} must divide C_in={C_in} and C_out={C_out}")
    a = conv_unfold(x, kernel_size, stride, padding, dilation)
    T = a.shape[1]
    if g.shape[0] != B or math.prod(g.shape[2:]) != T:
        raise ValueError(
            f"conv: output gradient of shape {tuple(g.shape)} does not match the {T} output positions of an input "
            f"{tuple(x.shape)} with kernel_size={kernel_size}, stride={stride}, padding={padding}, dilation={dilation}"
        )
    a = a.reshape(B, T, groups, -1).transpose(1, 2).reshape(B * groups, T, -1)
    gr = g.reshape(B, groups, C_out // groups, T).transpose(2, 3).reshape(B * groups, T, C_out // groups)
    return a, gr


def conv_norms(
    x: Tensor,
    g: Tensor,
    *,
    kernel_size: IntOrSeq,
    stride: IntOrSeq,
    padding: IntOrSeq,
    dilation: IntOrSeq,
    groups: int,
    bias: bool,
    method: str,
) -> tuple[Tensor, Tensor | None]:
    """Per-sample squared norms of a Conv1d/2d/3d layer's weight and bias gradients.

    weight: sum_j ||G_ij^T A_ij||_F^2 over groups j, A = unfold(x), each term by ``method``
            ("ghost": <A A^T, G G^T>, "inst": sum (G^T A)^2; see linear_norms)
    bias:   ||sum_t g_t||^2
    x: (B, C_in, *S), zero-padded by ``padding`` (other padding modes are applied by the caller);
    g: (B, C_out, *out). Returns float32 (float64 for float64 inputs) tensors of shape (B,).
    The batch is processed in chunks so that the unfolded input stays bounded.
    """
    if method not in ("ghost", "inst"):
        raise ValueError(f"conv_norms: method must be 'ghost' or 'inst', got {method!r}")
    dt = acc_dtype(x, g)
    B = x.shape[0]
    n = x.dim() - 2
    T = math.prod(g.shape[2:])
    per_sample = T * x.shape[1] * math.prod(_ntuple(kernel_size, n, "kernel_size"))
    w = torch.empty(B, device=x.device, dtype=dt)
    geom = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups)
    for sl in _chunks(B, per_sample):
        a, gr = conv_rows(x[sl], g[sl], **geom)  # type: ignore[arg-type]
        nw, _ = linear_norms(a, gr, bias=False, method=method)
        w[sl] = nw.view(-1, groups).sum(dim=1)
    b = bias_norms(g.flatten(2).transpose(1, 2)) if bias else None
    return w, b


def conv_clipped_sum(
    x: Tensor,
    g: Tensor,
    c: Tensor,
    *,
    weight_shape: Sequence[int],
    stride: IntOrSeq,
    padding: IntOrSeq,
    dilation: IntOrSeq,
    groups: int,
    bias: bool,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed_w: int = 0,
    seed_b: int = 0,
    prev_w: Tensor | None = None,
    prev_b: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Clipped, summed, noised Conv gradients.

    weight: scale * (prev_w + sum_i c_i grad_W(x_i, g_i) + noise_std * z_w)   weight_shape
            = the weight gradient of the conv with g's samples scaled by c (one convolution_backward)
    bias:   scale * (prev_b + sum_i c_i sum_t g_it + noise_std * z_b)         (C_out,)
    Computed in float32 (float64 for float64 inputs). A sample with c_i = 0 adds exactly 0, even with
    non-finite rows (_common.kept: its x and g are set to 0 before the convolution's backward).
    """
    dt = acc_dtype(x, g)
    n = x.dim() - 2
    drop = c == 0
    gs = kept(g, drop, dt, c)
    weight = torch.empty(tuple(weight_shape), device=x.device, dtype=dt)  # only its shape is read
    _, w, _ = torch.ops.aten.convolution_backward(
        gs,
        kept(x, drop, dt),
        weight,
        None,
        list(_ntuple(stride, n, "stride")),
        list(_ntuple(padding, n, "padding")),
        list(_ntuple(dilation, n, "dilation")),
        False,
        [0] * n,
        groups,
        [False, True, False],
    )
    w = finish(w, prev_w, noise_std, scale, seed_w, fresh=True)
    b = None
    if bias:
        b = bias_clipped_sum(
            g.flatten(2).transpose(1, 2), c, noise_std=noise_std, scale=scale, seed=seed_b, prev=prev_b
        )
    return w, b
