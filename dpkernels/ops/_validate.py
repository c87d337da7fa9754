"""The input checks of every op, in one place: the dispatcher (dpkernels.ops) runs them before any
backend, so every backend (reference, triton, cuda) accepts and refuses the same inputs with the
same error. The backends' kernels may then assume what is checked here.

One function per op, with the op's name and signature (dpkernels.ops.reference). What is refused:

- TypeError: a tensor argument that is not a float16/bfloat16/float32/float64 tensor (ids: not
  int32/int64), or a non-tensor where a tensor belongs;
- ValueError: shapes that disagree (the batch of a and g, a ``prev`` that only broadcasts to the
  output's shape, a clip factor per sample), tensors on different devices, a conv geometry that does
  not fit its input, a non-finite or negative ``noise_std``, a non-finite ``scale``, an unknown method;
- IndexError: embedding ids outside [0, num_embeddings), as torch's own embedding refuses them.

Errors name the op and the argument and say what is expected. Every check reads only shapes, dtypes
and devices, except the ids range: one min/max over the ids, which on a GPU waits for them (a
synchronisation per embedding op; a kernel would otherwise scatter to rows past the table). Under
torch.compile the ids range is not checked (a graph cannot branch on values).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IDS = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------- pieces


def _tensor(op: str, name: str, t: Any, dtypes: tuple[torch.dtype, ...] = FLOATS) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        kinds = "int32 or int64" if dtypes == IDS else "float16, bfloat16, float32 or float64"
        raise TypeError(f"{op}: {name} must be a {kinds} tensor, got {t.dtype}")
    return t


def _shape(op: str, name: str, t: Tensor, dims: str, ok: bool, expected: str = "") -> None:
    if not ok:
        raise ValueError(f"{op}: {name} must be {dims}{expected}, got shape {tuple(t.shape)}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """One device; an index left out ("cuda") stands for the current one, so it matches any."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _device(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} on {ref.device}; move both to one device")


def _clip(op: str, c: Any, B: int, ref_name: str, ref: Tensor) -> None:
    """c: (B,) floating, one clip factor per sample, on the device of ``ref``."""
    _tensor(op, "c", c)
    if tuple(c.shape) != (B,):
        raise ValueError(f"{op}: c must hold one clip factor per sample, shape ({B},), got {tuple(c.shape)}")
    _device(op, "c", c, ref_name, ref)


def _prev(op: str, name: str, prev: Any, shape: Sequence[int], device: torch.device) -> None:
    """An optional running sum of exactly the output's shape (one that only broadcasts is refused:
    it would add the same values to every row, or be summed away)."""
    if prev is None:
        return
    _tensor(op, name, prev)
    if tuple(prev.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have the output's shape {tuple(shape)}, got {tuple(prev.shape)}")
    if not _same_device(prev.device, device):
        raise ValueError(f"{op}: {name} is on {prev.device} but the inputs on {device}; move it to their device")


def _epilogue(op: str, noise_std: Any, scale: Any, seeds: dict[str, Any]) -> None:
    if not isinstance(noise_std, numbers.Real) or not math.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"{op}: noise_std must be a finite number >= 0, got {noise_std!r}")
    if not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")
    for name, seed in seeds.items():
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{op}: {name} must be an int, got {type(seed).__name__}")


def _method(op: str, method: Any) -> None:
    if method not in ("ghost", "inst"):
        raise ValueError(f"{op}: method must be 'ghost' or 'inst', got {method!r}")


def _rows(op: str, a: Any, g: Any, a_name: str = "a") -> None:
    """a: (B, T, d), g: (B, T, p), floating, one device."""
    _tensor(op, "g", g)
    _shape(op, "g", g, "(B, T, p)", g.dim() == 3, "; flatten the middle dimensions first")
    if a is not None:
        _tensor(op, a_name, a)
        _shape(
            op,
            a_name,
            a,
            "(B, T, d)",
            a.dim() == 3 and a.shape[:2] == g.shape[:2],
            f" with g's (B, T) {tuple(g.shape[:2])}",
        )
        _device(op, a_name, a, "g", g)


_ids_looked_up: contextvars.ContextVar[bool] = contextvars.ContextVar("dpkernels_ids_looked_up", default=False)


@contextlib.contextmanager
def ids_looked_up() -> Iterator[None]:
    """Inside: every ids tensor reaching an op was looked up by a DP Embedding's forward, whose
    F.embedding refused ids outside the table, so the range check (a host read of the ids' min and
    max, a device sync on CUDA) is skipped. The engine's backward sets it; direct op and
    dpkernels.api calls keep the check."""
    token = _ids_looked_up.set(True)
    try:
        yield
    finally:
        _ids_looked_up.reset(token)


def _ids_range(op: str, ids: Tensor, num_embeddings: int) -> None:
    """ids in [0, num_embeddings): checked last, after every check that reads no values."""
    if _ids_looked_up.get():
        return
    if ids.numel() and not torch.compiler.is_compiling():  # a traced graph cannot branch on values
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= num_embeddings:
            raise IndexError(
                f"{op}: ids must lie in [0, {num_embeddings}) (the table's rows), got values in [{lo}, {hi}]"
            )


def _table(op: str, num_embeddings: Any, padding_idx: Any) -> None:
    if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) or num_embeddings < 0:
        raise ValueError(f"{op}: num_embeddings must be an int >= 0, got {num_embeddings!r}")
    if padding_idx is not None and (
        isinstance(padding_idx, bool)
        or not isinstance(padding_idx, int)
        or not -num_embeddings <= padding_idx < num_embeddings
    ):
        raise ValueError(
            f"{op}: padding_idx must be None or an int in [-{num_embeddings}, {num_embeddings}), got {padding_idx!r}"
        )


def _ntuple(op: str, name: str, v: Any, n: int) -> tuple[int, ...]:
    """An int, or one int per spatial dim (a single one repeated), as torch's conv layers take them."""
    t = (v,) if isinstance(v, int) else tuple(v) if isinstance(v, Sequence) else None
    if t is None or not all(isinstance(e, int) and not isinstance(e, bool) for e in t) or len(t) not in (1, n):
        raise ValueError(f"{op}: {name} must be an int or {n} ints for a {n}-d convolution, got {v!r}")
    return t * n if len(t) == 1 else t


def _conv(op: str, x: Any, g: Any, kernel_size: Any, stride: Any, padding: Any, dilation: Any, groups: Any) -> None:
    """x (B, C_in, *S) and g (B, C_out, *out) against the conv's geometry (zero padding)."""
    _tensor(op, "x", x)
    _tensor(op, "g", g)
    _shape(op, "x", x, "(B, C_in, *spatial) with at least one spatial dim", x.dim() >= 3)
    _shape(
        op,
        "g",
        g,
        "the conv output's gradient (B, C_out, *out)",
        g.dim() >= 2 and g.shape[0] == x.shape[0],
        f" with the B = {x.shape[0]} of x",
    )
    _device(op, "x", x, "g", g)
    n = x.dim() - 2
    k = _ntuple(op, "kernel_size", kernel_size, n)
    s = _ntuple(op, "stride", stride, n)
    pad = _ntuple(op, "padding", padding, n)
    dil = _ntuple(op, "dilation", dilation, n)
    if min(k) < 1 or min(s) < 1 or min(dil) < 1 or min(pad) < 0:
        raise ValueError(
            f"{op}: kernel_size, stride and dilation must be >= 1 and padding >= 0, got kernel_size={k}, "
            f"stride={s}, padding={pad}, dilation={dil}"
        )
    c_in, c_out = x.shape[1], g.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"{op}: groups={groups!r} must be an int >= 1 dividing C_in={c_in} and C_out={c_out}")
    T = 1
    for i in range(n):
        span = dil[i] * (k[i] - 1) + 1
        size = x.shape[2 + i] + 2 * pad[i]
        if size < span:
            raise ValueError(
                f"{op}: spatial dim {i} has size {size} after padding, smaller than the dilated kernel ({span}); "
                "pad the input or use a smaller kernel/dilation"
            )
        T *= (size - span) // s[i] + 1
    if math.prod(g.shape[2:]) != T:
        raise ValueError(
            f"{op}: output gradient of shape {tuple(g.shape)} does not match the {T} output positions of an input "
            f"{tuple(x.shape)} with kernel_size={k}, stride={s}, padding={pad}, dilation={dil}"
        )


# ----------------------------------------------------------------------------- ops


def linear_norms(a: Any, g: Any, *, bias: bool, method: str) -> None:
    _method("linear_norms", method)
    _rows("linear_norms", a, g)


def linear_clipped_sum(
    a: Any,
    g: Any,
    c: Any,
    *,
    bias: bool,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed_w: int = 0,
    seed_b: int = 0,
    prev_w: Any = None,
    prev_b: Any = None,
) -> None:
    op = "linear_clipped_sum"
    _rows(op, a, g)
    _clip(op, c, g.shape[0], "g", g)
    _prev(op, "prev_w", prev_w, (g.shape[2], a.shape[2]), g.device)
    _prev(op, "prev_b", prev_b, (g.shape[2],), g.device)
    _epilogue(op, noise_std, scale, {"seed_w": seed_w, "seed_b": seed_b})


def bias_norms(g: Any) -> None:
    _rows("bias_norms", None, g)


def bias_clipped_sum(
    g: Any, c: Any, *, noise_std: float = 0.0, scale: float = 1.0, seed: int = 0, prev: Any = None
) -> None:
    op = "bias_clipped_sum"
    _rows(op, None, g)
    _clip(op, c, g.shape[0], "g", g)
    _prev(op, "prev", prev, (g.shape[2],), g.device)
    _epilogue(op, noise_std, scale, {"seed": seed})


def conv_norms(
    x: Any, g: Any, *, kernel_size: Any, stride: Any, padding: Any, dilation: Any, groups: int, bias: bool, method: str
) -> None:
    _method("conv_norms", method)
    _conv("conv_norms", x, g, kernel_size, stride, padding, dilation, groups)


def conv_clipped_sum(
    x: Any,
    g: Any,
    c: Any,
    *,
    weight_shape: Sequence[int],
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
    bias: bool,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed_w: int = 0,
    seed_b: int = 0,
    prev_w: Any = None,
    prev_b: Any = None,
) -> None:
    op = "conv_clipped_sum"
    _tensor(op, "x", x)
    n = x.dim() - 2
    ws = tuple(weight_shape) if isinstance(weight_shape, Sequence) else ()
    if len(ws) != n + 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in ws):
        raise ValueError(
            f"{op}: weight_shape must be (C_out, C_in/groups, *kernel_size) with {n} kernel dims for an input of "
            f"shape {tuple(x.shape)}, got {weight_shape!r}"
        )
    _conv(op, x, g, ws[2:], stride, padding, dilation, groups)
    if ws[:2] != (g.shape[1], x.shape[1] // groups):
        raise ValueError(
            f"{op}: weight_shape {ws} does not match C_out={g.shape[1]} of g and "
            f"C_in/groups={x.shape[1] // groups} of x"
        )
    _clip(op, c, x.shape[0], "x", x)
    _prev(op, "prev_w", prev_w, ws, x.device)
    _prev(op, "prev_b", prev_b, (g.shape[1],), x.device)
    _epilogue(op, noise_std, scale, {"seed_w": seed_w, "seed_b": seed_b})


def _embedding_rows(op: str, ids: Any, g: Any, num_embeddings: int, padding_idx: Any, g_name: str = "g") -> None:
    _table(op, num_embeddings, padding_idx)
    _tensor(op, "ids", ids, IDS)
    _tensor(op, g_name, g)
    _shape(op, "ids", ids, "(B, T)", ids.dim() == 2, "; flatten the non-batch dimensions first")
    _shape(
        op,
        g_name,
        g,
        "(B, T, D)",
        g.dim() == 3 and g.shape[:2] == ids.shape,
        f" with the (B, T) of ids {tuple(ids.shape)}",
    )
    _device(op, g_name, g, "ids", ids)


def embedding_norms(ids: Any, g: Any, *, num_embeddings: int, padding_idx: int | None) -> None:
    _embedding_rows("embedding_norms", ids, g, num_embeddings, padding_idx)
    _ids_range("embedding_norms", ids, num_embeddings)


def embedding_clipped_sum(
    ids: Any,
    g: Any,
    c: Any,
    *,
    num_embeddings: int,
    padding_idx: int | None,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed: int = 0,
    prev: Any = None,
) -> None:
    op = "embedding_clipped_sum"
    _embedding_rows(op, ids, g, num_embeddings, padding_idx)
    _clip(op, c, g.shape[0], "g", g)
    _prev(op, "prev", prev, (num_embeddings, g.shape[2]), g.device)
    _epilogue(op, noise_std, scale, {"seed": seed})
    _ids_range(op, ids, num_embeddings)


def embedding_linear_cross(ids: Any, g_e: Any, a: Any, g_h: Any, *, padding_idx: int | None) -> None:
    op = "embedding_linear_cross"
    _tensor(op, "g_h", g_h)
    _shape(op, "g_h", g_h, "(B, Th, V)", g_h.dim() == 3)
    _embedding_rows(op, ids, g_e, g_h.shape[2], padding_idx, "g_e")
    _tensor(op, "a", a)
    B, D = ids.shape[0], g_e.shape[2]
    _shape(op, "a", a, "(B, Th, D)", a.dim() == 3 and a.shape[0] == B and a.shape[2] == D, f" with B = {B}, D = {D}")
    _shape(op, "g_h", g_h, "(B, Th, V)", g_h.shape[:2] == a.shape[:2], f" with the (B, Th) of a {tuple(a.shape[:2])}")
    _device(op, "a", a, "ids", ids)
    _device(op, "g_h", g_h, "ids", ids)
    _ids_range(op, ids, g_h.shape[2])


def _affine(op: str, xhat: Any, g: Any) -> None:
    _tensor(op, "g", g)
    _tensor(op, "xhat", xhat)
    _shape(op, "g", g, "(B, T, C)", g.dim() == 3, "; reshape the rows first")
    _shape(op, "xhat", xhat, "g's shape", xhat.shape == g.shape, f" {tuple(g.shape)}")
    _device(op, "xhat", xhat, "g", g)


def affine_norms(xhat: Any, g: Any, *, weight: bool, bias: bool) -> None:
    _affine("affine_norms", xhat, g)


def affine_clipped_sum(
    xhat: Any,
    g: Any,
    c: Any,
    *,
    weight: bool,
    bias: bool,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed_w: int = 0,
    seed_b: int = 0,
    prev_w: Any = None,
    prev_b: Any = None,
) -> None:
    op = "affine_clipped_sum"
    _affine(op, xhat, g)
    _clip(op, c, g.shape[0], "g", g)
    _prev(op, "prev_w", prev_w, (g.shape[2],), g.device)
    _prev(op, "prev_b", prev_b, (g.shape[2],), g.device)
    _epilogue(op, noise_std, scale, {"seed_w": seed_w, "seed_b": seed_b})


def add_noise(
    prev: Any, shape: Any, *, noise_std: float, scale: float, seed: int, device: Any, dtype: Any = torch.float32
) -> None:
    op = "add_noise"
    dims = tuple(shape) if isinstance(shape, Sequence) else None
    if dims is None or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in dims):
        raise ValueError(f"{op}: shape must be a sequence of ints >= 0, got {shape!r}")
    if dtype not in FLOATS:
        raise TypeError(f"{op}: dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    _prev(op, "prev", prev, dims, torch.device(device))
    _epilogue(op, noise_std, scale, {"seed": seed})


def secure_noise(
    prev: Any,
    shape: Any,
    *,
    noise_std: float,
    scale: float,
    key: Any,
    nonce: Any,
    device: Any,
    dtype: Any = torch.float32,
) -> None:
    from .reference.chacha import check_words

    op = "secure_noise"
    dims = tuple(shape) if isinstance(shape, Sequence) else None
    if dims is None or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in dims):
        raise ValueError(f"{op}: shape must be a sequence of ints >= 0, got {shape!r}")
    if dtype not in FLOATS:
        raise TypeError(f"{op}: dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    _prev(op, "prev", prev, dims, torch.device(device))
    _epilogue(op, noise_std, scale, {})
    check_words(op, key, nonce)
