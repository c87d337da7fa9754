"""The compiled backend: the ops of csrc/ as `torch.library` ops ``dpkernels::cuda_<op>``.

Each op's schema and its CPU and CUDA implementations are registered from C++ (csrc/<family>.cpp,
one host code for both devices; kernels.h holds the device code, functors the CPU runs with
at::parallel_for and CUDA as kernels). This module loads the library (building it on first use, see
_build.py), registers each op's fake impl once, and exposes the ops under the reference's names and
signatures (dpkernels.ops.reference), so ``dpkernels.ops.set_backend("cuda")`` serves them on CPU
tensors too. Importing it fails when the library cannot be built or loaded, and the dispatcher
then lists the backend as unavailable (with the reason).

Results match the reference's up to rounding, except the noise: z_j is Philox4x32-10 keyed by the
seed and the element's flat offset j with Box-Muller, the stream of the Triton backend (tl.randn), not
torch.Generator's; the same numbers on the CPU and on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..reference._common import acc_dtype
from ._build import load

info = load()
_ops = torch.ops.dpkernels
SEED_MASK = (1 << 63) - 1


def _fake(name: str):
    def register(fn):
        torch.library.register_fake(f"dpkernels::cuda_{name}")(fn)
        return fn

    return register


def _vec(like: Tensor, n: int, dt: torch.dtype, wanted: bool = True) -> Tensor:
    return like.new_empty((n if wanted else 0,), dtype=dt)


@_fake("linear_norms")
def _(a, g, bias, method):
    dt = acc_dtype(a, g)
    return _vec(g, g.shape[0], dt), _vec(g, g.shape[0], dt, bias)


@_fake("linear_clipped_sum")
def _(a, g, c, bias, noise_std, scale, seed_w, seed_b, prev_w, prev_b, path=0, splits=0):
    dt = acc_dtype(a, g)
    return g.new_empty((g.shape[-1], a.shape[-1]), dtype=dt), _vec(g, g.shape[-1], dt, bias)


@_fake("bias_norms")
def _(g):
    return _vec(g, g.shape[0], acc_dtype(g))


@_fake("bias_clipped_sum")
def _(g, c, noise_std, scale, seed, prev):
    return _vec(g, g.shape[-1], acc_dtype(g))


@_fake("conv_norms")
def _(x, g, kernel_size, stride, padding, dilation, groups, bias, method, path=0, splits=0):
    dt = acc_dtype(x, g)
    return _vec(x, x.shape[0], dt), _vec(x, x.shape[0], dt, bias)


@_fake("conv_clipped_sum")
def _(
    x,
    g,
    c,
    weight_shape,
    stride,
    padding,
    dilation,
    groups,
    bias,
    noise_std,
    scale,
    seed_w,
    seed_b,
    prev_w,
    prev_b,
    path=0,
    splits=0,
):
    dt = acc_dtype(x, g)
    return x.new_empty(tuple(weight_shape), dtype=dt), _vec(x, g.shape[1], dt, bias)


@_fake("embedding_norms")
def _(ids, g, num_embeddings, padding_idx):
    return _vec(g, ids.shape[0], acc_dtype(g))


@_fake("embedding_clipped_sum")
def _(ids, g, c, num_embeddings, padding_idx, noise_std, scale, seed, prev):
    return g.new_empty((num_embeddings, g.shape[-1]), dtype=acc_dtype(g))


@_fake("embedding_linear_cross")
def _(ids, g_e, a, g_h, padding_idx):
    return _vec(g_e, ids.shape[0], acc_dtype(g_e, a, g_h))


@_fake("affine_norms")
def _(xhat, g, weight, bias):
    dt = acc_dtype(xhat, g)
    return _vec(g, g.shape[0], dt, weight), _vec(g, g.shape[0], dt, bias)


@_fake("affine_clipped_sum")
def _(xhat, g, c, weight, bias, noise_std, scale, seed_w, seed_b, prev_w, prev_b):
    dt = acc_dtype(xhat, g)
    return _vec(g, g.shape[-1], dt, weight), _vec(g, g.shape[-1], dt, bias)


@_fake("add_noise")
def _(like, prev, shape, noise_std, scale, seed):
    return like.new_empty(tuple(shape))


@_fake("philox")
def _(ctr, k0, k1):
    return torch.empty_like(ctr)


@_fake("secure_noise")
def _(like, prev, shape, noise_std, scale, key, nonce):
    return like.new_empty(tuple(shape))


@_fake("chacha20")
def _(ctr, key, nonce):
    return ctr.new_empty((ctr.shape[0], 16))


# ----------------------------------------------------------------------------- the ops (reference signatures)


def _ints(v: int | Sequence[int]) -> list[int]:
    return [int(v)] if isinstance(v, int) else [int(e) for e in v]


def _seed(s: int) -> int:
    return int(s) & SEED_MASK


def linear_norms(a: Tensor, g: Tensor, *, bias: bool, method: str) -> tuple[Tensor, Tensor | None]:
    """See dpkernels.ops.reference.linear_norms."""
    w, b = _ops.cuda_linear_norms(a, g, bool(bias), str(method))
    return w, (b if bias else None)


def linear_clipped_sum(
    a: Tensor,
    g: Tensor,
    c: Tensor,
    *,
    bias: bool,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed_w: int = 0,
    seed_b: int = 0,
    prev_w: Tensor | None = None,
    prev_b: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """See dpkernels.ops.reference.linear_clipped_sum."""
    w, b = _ops.cuda_linear_clipped_sum(
        a, g, c, bool(bias), float(noise_std), float(scale), _seed(seed_w), _seed(seed_b), prev_w, prev_b
    )
    return w, (b if bias else None)


def bias_norms(g: Tensor) -> Tensor:
    """See dpkernels.ops.reference.bias_norms."""
    return _ops.cuda_bias_norms(g)


def bias_clipped_sum(
    g: Tensor, c: Tensor, *, noise_std: float = 0.0, scale: float = 1.0, seed: int = 0, prev: Tensor | None = None
) -> Tensor:
    """See dpkernels.ops.reference.bias_clipped_sum."""
    return _ops.cuda_bias_clipped_sum(g, c, float(noise_std), float(scale), _seed(seed), prev)


def conv_norms(
    x: Tensor,
    g: Tensor,
    *,
    kernel_size,
    stride,
    padding,
    dilation,
    groups: int,
    bias: bool,
    method: str,
) -> tuple[Tensor, Tensor | None]:
    """See dpkernels.ops.reference.conv_norms."""
    w, b = _ops.cuda_conv_norms(
        x, g, _ints(kernel_size), _ints(stride), _ints(padding), _ints(dilation), int(groups), bool(bias), str(method)
    )
    return w, (b if bias else None)


def conv_clipped_sum(
    x: Tensor,
    g: Tensor,
    c: Tensor,
    *,
    weight_shape: Sequence[int],
    stride,
    padding,
    dilation,
    groups: int,
    bias: bool,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed_w: int = 0,
    seed_b: int = 0,
    prev_w: Tensor | None = None,
    prev_b: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """See dpkernels.ops.reference.conv_clipped_sum."""
    w, b = _ops.cuda_conv_clipped_sum(
        x,
        g,
        c,
        _ints(weight_shape),
        _ints(stride),
        _ints(padding),
        _ints(dilation),
        int(groups),
        bool(bias),
        float(noise_std),
        float(scale),
        _seed(seed_w),
        _seed(seed_b),
        prev_w,
        prev_b,
    )
    return w, (b if bias else None)


def embedding_norms(ids: Tensor, g: Tensor, *, num_embeddings: int, padding_idx: int | None) -> Tensor:
    """See dpkernels.ops.reference.embedding_norms."""
    return _ops.cuda_embedding_norms(ids, g, int(num_embeddings), padding_idx)


def embedding_clipped_sum(
    ids: Tensor,
    g: Tensor,
    c: Tensor,
    *,
    num_embeddings: int,
    padding_idx: int | None,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed: int = 0,
    prev: Tensor | None = None,
) -> Tensor:
    """See dpkernels.ops.reference.embedding_clipped_sum (dense noise over the whole table)."""
    return _ops.cuda_embedding_clipped_sum(
        ids, g, c, int(num_embeddings), padding_idx, float(noise_std), float(scale), _seed(seed), prev
    )


def embedding_linear_cross(ids: Tensor, g_e: Tensor, a: Tensor, g_h: Tensor, *, padding_idx: int | None) -> Tensor:
    """See dpkernels.ops.reference.embedding_linear_cross."""
    return _ops.cuda_embedding_linear_cross(ids, g_e, a, g_h, padding_idx)


def affine_norms(xhat: Tensor, g: Tensor, *, weight: bool, bias: bool) -> tuple[Tensor | None, Tensor | None]:
    """See dpkernels.ops.reference.affine_norms."""
    w, b = _ops.cuda_affine_norms(xhat, g, bool(weight), bool(bias))
    return (w if weight else None), (b if bias else None)


def affine_clipped_sum(
    xhat: Tensor,
    g: Tensor,
    c: Tensor,
    *,
    weight: bool,
    bias: bool,
    noise_std: float = 0.0,
    scale: float = 1.0,
    seed_w: int = 0,
    seed_b: int = 0,
    prev_w: Tensor | None = None,
    prev_b: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """See dpkernels.ops.reference.affine_clipped_sum."""
    w, b = _ops.cuda_affine_clipped_sum(
        xhat,
        g,
        c,
        bool(weight),
        bool(bias),
        float(noise_std),
        float(scale),
        _seed(seed_w),
        _seed(seed_b),
        prev_w,
        prev_b,
    )
    return (w if weight else None), (b if bias else None)


def add_noise(
    prev: Tensor | None, shape, *, noise_std: float, scale: float, seed: int, device, dtype: torch.dtype = torch.float32
) -> Tensor:
    """scale * (prev + noise_std * z), computed in fp32 (fp64 for float64) and rounded once to ``dtype``."""
    shape = [int(s) for s in shape]
    like = torch.empty(0, device=device, dtype=dtype)  # carries device and dtype to the dispatcher
    return _ops.cuda_add_noise(like, prev, shape, float(noise_std), float(scale), _seed(seed))


def secure_noise(
    prev: Tensor | None,
    shape,
    *,
    noise_std: float,
    scale: float,
    key: Sequence[int],
    nonce: Sequence[int],
    device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """See dpkernels.ops.reference.secure_noise: the same stream (csrc/kernels.h's chacha20_block)."""
    from ..reference.chacha import check_words

    key, nonce = check_words("secure_noise", key, nonce)
    like = torch.empty(0, device=device, dtype=dtype)  # carries device and dtype to the dispatcher
    return _ops.cuda_secure_noise(like, prev, [int(s) for s in shape], float(noise_std), float(scale), key, nonce)


def chacha20_blocks(counter: Tensor, key: Sequence[int], nonce: Sequence[int]) -> Tensor:
    """The raw ChaCha20 blocks, for the tests: (N, 16) int64 holding uint32 words, as the reference's."""
    from ..reference.chacha import MASK, check_words

    key, nonce = check_words("chacha20_blocks", key, nonce)
    return _ops.cuda_chacha20(counter & MASK, key, nonce)


__all__ = [
    "add_noise",
    "chacha20_blocks",
    "affine_clipped_sum",
    "affine_norms",
    "bias_clipped_sum",
    "bias_norms",
    "conv_clipped_sum",
    "conv_norms",
    "embedding_clipped_sum",
    "embedding_linear_cross",
    "embedding_norms",
    "info",
    "linear_clipped_sum",
    "linear_norms",
    "secure_noise",
]
