"""What every Triton op shares: the op namespace and registration, the input dtype promotion, launch
configurations, the one launch point, and the device functions that load clipped gradient rows and
keep fp16 products in range. Inputs are checked by the dispatcher before any backend (ops._validate).

Every kernel is launched through `launch`, so that ``bench/aot_compile.py`` can record
exactly what a launcher would run (kernel, argument types, constexprs, warps, stages)
by replacing it, and compile that ahead of time for sm_90 with no GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..bounds import fp32_matmul_reduced
from ..reference._common import acc_dtype  # noqa: F401  (re-exported: the ops accumulate as the reference)

NS = "dpkernels"  # the one torch.library namespace of every dpkernels op
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SEED_MASK = (1 << 63) - 1  # seeds are 63-bit, as in the reference's `gaussian`

# ----------------------------------------------------------------------------- ops


def register_op(name: str, fake: Callable) -> Callable:
    """A decorator: register a function as the `torch.library.custom_op` ``dpkernels::triton_<name>``,
    its annotations the schema, with ``fake`` as its fake impl. Applied to a launcher whose signature is
    the op's, or to a wrapper that drops a launcher's test-only arguments. The prefix keeps the csrc
    backend free to register its own ops in the namespace."""

    def register(fn: Callable):
        op = torch.library.custom_op(f"{NS}::triton_{name}", mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return register


def output(like: Tensor, shape: tuple[int, ...], dtype: torch.dtype, wanted: bool = True) -> Tensor:
    """An uninitialised tensor on ``like``'s device, or (0,) for an output not asked for (a custom op
    returns a tensor always). For the launchers and the fake impls alike."""
    return like.new_empty(shape if wanted else (0,), dtype=dtype)


def per_sample(parts: Tensor) -> Tensor:
    """(B, n) partial sums, one per program, summed per sample in a fixed order: deterministic, no
    atomics. An output not asked for, (0,), stays as it is."""
    return parts.sum(1) if parts.dim() == 2 else parts


def epilogue_args(noise_std: float, scale: float, *seeds: int) -> tuple:
    """The epilogue's runtime arguments in the kernels' (and the ops' schemas') order: noise_std, scale,
    then one 63-bit seed per output."""
    return (float(noise_std), float(scale), *(int(s) & SEED_MASK for s in seeds))


def given_or(t: Tensor | None, stand_in: Tensor) -> Tensor:
    """``t`` made contiguous, or ``stand_in`` for an absent tensor (its HAS_* constexpr False: never read)."""
    return t.contiguous() if t is not None else stand_in


# ----------------------------------------------------------------------------- launch


def interpreting(kernel: Any) -> bool:
    """Whether ``kernel`` runs in Triton's CPU interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


@dataclass
class Launch:
    """One kernel launch as the host launcher made it: what `observe_launches` records."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    num_warps: int
    num_stages: int
    maxnreg: int | None
    meta: dict = field(default_factory=dict)  # the constexpr keywords (block sizes, flags)

    def describe(self) -> str:
        """``name[grid] warps/stages`` and the int constexprs, e.g. for a benchmark's table."""
        blocks = " ".join(f"{k}={v}" for k, v in self.meta.items() if isinstance(v, int) and not isinstance(v, bool))
        reg = f" maxnreg={self.maxnreg}" if self.maxnreg is not None else ""
        grid = "x".join(str(g) for g in self.grid)
        return f"{self.kernel.__name__}[{grid}] warps={self.num_warps} stages={self.num_stages}{reg} {blocks}".rstrip()


_observer: contextvars.ContextVar[tuple[list[Launch], bool] | None] = contextvars.ContextVar(
    "dpkernels_launch_observer", default=None
)


@contextlib.contextmanager
def observe_launches(*, run: bool = True) -> Iterator[list[Launch]]:
    """Record every kernel launch this thread's ops make inside the block (what a benchmark reports as
    the configuration each kernel ran with). ``run=False`` records without launching: the host
    launchers then accept tensors on any device, meta tensors included (bench/aot_compile.py)."""
    out: list[Launch] = []
    token = _observer.set((out, run))
    try:
        yield out
    finally:
        _observer.reset(token)


def launch(
    kernel: Any,
    grid: tuple[int, ...],
    *args: Any,
    num_warps: int = 4,
    num_stages: int = 2,
    maxnreg: int | None = None,
    **meta: Any,
):
    """``kernel[grid](*args, **meta)``, after checking that the tensors can reach the kernel. ``maxnreg``
    caps the registers a thread (PTX .maxnreg); None leaves the choice to ptxas."""
    observer = _observer.get()
    if observer is not None:
        observer[0].append(Launch(kernel, tuple(grid), args, num_warps, num_stages, maxnreg, dict(meta)))
        if not observer[1]:
            return
    if not interpreting(kernel):
        for x in args:
            if isinstance(x, Tensor) and x.device.type != "cuda":
                raise RuntimeError(
                    f"dpkernels triton backend: {kernel.__name__} got a {x.device.type} tensor; Triton kernels run on "
                    "CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set before triton is imported). "
                    "Use dpkernels.set_backend('reference') for CPU tensors."
                )
    if maxnreg is not None:  # the interpreter ignores it
        meta["maxnreg"] = maxnreg
    kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **meta)


def acc_tl(dtype: torch.dtype):
    """The kernels' ACC constexpr for an accumulation dtype (acc_dtype): float64 or float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: TF32 for float32 only where torch's own matmuls may use it
    (torch.set_float32_matmul_precision "high"/"medium", or a per-backend fp32_precision "tf32"/"bf16":
    `bounds.fp32_matmul_reduced`, which `bounds.backend_arithmetic` reads too), so the kernel rounds like
    the reference's matmul on the same GPU; "ieee" otherwise (and for the 16-bit and float64 types)."""
    if dtype == torch.float32 and fp32_matmul_reduced():
        return "tf32"
    return "ieee"


def dot_operand(kernel: Any, dtype: torch.dtype):
    """The dtype tl.dot's operands are cast to: the input dtype, except bfloat16 under the interpreter,
    whose tl.dot multiplies bf16 bit patterns as integers (triton 3.8 keeps bf16 as uint16 in numpy).
    There float32 stands in: a product of two bf16 values is exact in fp32, so an fp32-accumulated
    dot gives the tensor-core result up to summation order."""
    if dtype == torch.bfloat16 and interpreting(kernel):
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}.get(dtype, tl.float64)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; an H100's 132 elsewhere (interpreter, meta, AOT)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


# ----------------------------------------------------------------------------- configs


def block(n: int, lo: int, hi: int) -> int:
    """The power of two covering ``n``, clamped to [lo, hi] (tl.dot needs every dimension >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def k_block(dtype: torch.dtype) -> int:
    """A matmul's reduction chunk: 64 for 16-bit, 32 for 4-byte, 16 for 8-byte inputs, so that three
    staged operand tiles fit shared memory and float64 tiles fit registers (AOT report)."""
    return {2: 64, 4: 32}.get(dtype.itemsize, 16)


def fma_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot on inputs of ``dtype`` runs on FMA units (IEEE float32, float64) rather than on
    tensor cores: its operands and accumulator then live in registers, not in shared memory / wgmma."""
    return dtype == torch.float64 or (dtype == torch.float32 and dot_precision(dtype) == "ieee")


def fma_warps(fma: bool, wide: bool) -> dict:
    """num_warps, num_stages (and maxnreg) of a matmul-like kernel: 8 warps for a wide tile, 4 otherwise,
    3 stages. A wide FMA tile gets 8 warps, a budget of 128 registers a thread (two blocks an SM) and
    one stage: its operands go through registers, not wgmma, and the staged copies' addresses cost
    registers. Left to itself ptxas for sm_90 picks a lower register target for these kernels and
    spills 8-136 B to reach it; with the budget and one stage none spills (AOT report)."""
    if fma and wide:
        return {"num_warps": 8, "maxnreg": 128, "num_stages": 1}
    return {"num_warps": 8 if wide else 4, "num_stages": 3}


def gram_tile_config(T: int, k: int, block_k: int, dtype: torch.dtype) -> dict:
    """64x64 Gram tiles (T x T) over a reduction of length ``k`` in chunks of up to ``block_k``: two
    float32 accumulators of 64x64 on 4 warps take 64 registers a thread together, leaving room for the
    staged operands. FMA dots hold their operands in registers too and take 8 warps (`fma_warps`)."""
    bt = block(T, 16, 64)
    fma = fma_dot(dtype)
    return dict(BLOCK_T=bt, BLOCK_K=block(k, 16, block_k), **fma_warps(fma, fma and bt >= 64))


def matmul_config(p: int, d: int, bk: int, dtype: torch.dtype, *, k_name: str = "BLOCK_K", gathered: bool = False):
    """(p, d) output tiles up to 128 x 128, shrunk to small layers, over K chunks of ``bk`` (the
    constexpr ``k_name``). 8 warps for a 128x128 accumulator, as for a plain matmul of that shape, or
    for a gathered (implicit-GEMM) operand tile of >= 16x128 elements, which holds an address and a
    mask per element; 4 otherwise. FMA dots (`fma_dot`) keep accumulator and operands in registers:
    their tiles stop at 64 x 128 (64 x 64 gathered) and are wide from 64 x 32 (`fma_warps`; AOT report
    for sm_90: 8-48 B of spills at 128 x 128, and on 4 warps at 64 x 32 to 64 x 64)."""
    fma = fma_dot(dtype)
    bp, bd = block(p, 16, 64 if fma else 128), block(d, 16, 64 if fma and gathered else 128)
    wide = bp * bd >= 128 * 128 or (gathered and bk * bd >= 16 * 128) or (fma and bp * bd >= 64 * 32)
    return {"BLOCK_P": bp, "BLOCK_D": bd, k_name: bk, **fma_warps(fma, wide)}


def ghost_pairs(op: str, T: int, block_t: int) -> tuple[int, int]:
    """(T-tiles, pairs of T-tiles I <= J): the ghost kernels' programs per sample."""
    n_tiles = triton.cdiv(T, block_t)
    if n_tiles >= 23170:  # the kernels' pair index arithmetic is int32: (2 n_tiles + 1)^2 must fit
        raise ValueError(f"{op}: T = {T} positions are too many for the ghost kernel; use method='inst'")
    return n_tiles, n_tiles * (n_tiles + 1) // 2


# ----------------------------------------------------------------------------- input dtype


def common_input(op: str, *tensors: Tensor) -> torch.dtype:
    """The one floating dtype the dot operands are cast to (tl.dot needs equal operand types)."""
    for t in tensors:
        if t.dtype not in FLOATS:
            raise TypeError(f"{op}: inputs must be float16, bfloat16, float32 or float64, got {t.dtype}")
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def cast_inputs(op: str, *tensors: Tensor) -> tuple[list[Tensor], torch.dtype]:
    """The tensors in their common_input dtype, and the accumulation dtype (acc_dtype)."""
    in_dt = common_input(op, *tensors)
    return [t.to(in_dt) for t in tensors], acc_dtype(*tensors)


# ----------------------------------------------------------------------------- device functions


@triton.jit
def load_exact(ptrs, mask):
    """float32 values of float32 or 16-bit entries, exactly, subnormals included (0 where masked):
    bfloat16 widened from its bits (b << 16 is the float32 of the same value), since the interpreter's
    bfloat16 conversion loses subnormals (1e-40 read as 0, which a certified bound must never do)."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptrs.to(tl.pointer_type(tl.int16)), mask=mask, other=0)
        x = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def clipped_rows(g_ptr, c_ptr, rows, mask_k, T, s_gb, s_gt, cols, mask_c, s_gc, ACC: tl.constexpr):
    """Rows (i, t) = divmod(rows, T) of g at columns ``cols``, each scaled by its sample's clip factor c_i
    in ACC as it loads (no pass over g to scale it: docs/design.md, speed lever 1). Returns the (rows, cols)
    tile c_i g_it, the rows' samples and positions, and ``keep``: mask_k and c_i != 0.

    A row whose sample has c_i = 0 is not loaded (0 in its place, the load's mask): it adds exactly 0,
    even when it holds inf or NaN (0 * inf is NaN); the caller masks its other operand's loads (A, xhat)
    with ``keep`` for the same reason. Free: the mask was there already, now per row."""
    sample = rows // T
    t = rows - sample * T
    c = tl.load(c_ptr + sample, mask=mask_k, other=0.0).to(ACC)
    keep = mask_k & (c != 0)
    g_rows = sample.to(tl.int64) * s_gb + t.to(tl.int64) * s_gt
    g = tl.load(g_ptr + g_rows[:, None] + cols[None, :] * s_gc, mask=keep[:, None] & mask_c[None, :], other=0.0)
    return g.to(ACC) * c[:, None], sample, t, keep


# Block floating point for fp16 operands of the clipped sums (`fp16_block_scale`): the running scale
# starts at 2^126 (no tile seen) and only decreases, so the accumulator never grows past it.
FP16_SCALE_START = tl.constexpr(2.0**126)


@triton.jit
def fp16_block_scale(x, scale):
    """The power of two 2^k that a tile x of fp32 products c_i g_it is multiplied by before its rounding
    to fp16 for a tensor-core dot, given the running ``scale`` of the accumulator: min(scale, 2^k) with
    2^k bringing the tile's largest |x| into [2^13, 2^14) (k from its exponent bits, exact; k <= 126).

    Why: c_i g_it of fp16 rows leaves fp16's range (c_i > 1 under automatic clipping overflows past
    65504 to inf; c_i << 1 flushes below 6e-8 to 0), while the reference multiplies in fp32. Scaled,
    the tile's largest product sits at 2^14 (margin to 65504) and a product p rounds to fp16 with error
    <= 2^-11 |p| + 2^-25 / scale <= 2^-11 |p| + 2^-38 max|x| (max over the rows this program reduced so
    far): fp16's full relative precision over 38 binades below the largest product. The dot's products
    of fp16 values are exact in its fp32 accumulator; the caller multiplies the accumulator by
    new / old when the scale drops and by 1 / scale at the end, both powers of two (exact). The scale
    only decreases so the accumulator (the sum times the scale) stays below 2^14 * 2^16 per product.
    The alternative, fp32 (TF32) operands, has fp32's range but halves tensor-core throughput and
    doubles the operand tiles in shared memory; this costs a max over the (BLOCK_K, BLOCK_P) tile per
    step and a rare rescale of the accumulator."""
    m = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    e = (m.to(tl.int32, bitcast=True) >> 23) & 255  # biased exponent: m in [2^(e-127), 2^(e-126))
    k = tl.minimum(140 - e, 126)  # 13 - (e - 127); an all-zero or fp32-subnormal tile gets 2^126
    return tl.minimum(scale, ((k + 127) << 23).to(tl.float32, bitcast=True))


@triton.jit
def tile_ranges(tile, n_tiles_c, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile ``tile`` of a row-major grid of (BLOCK_R x BLOCK_C) tiles, ``n_tiles_c`` a row, over an (R, C)
    matrix: its row indices and their mask, its column indices and their mask, and its column-tile index."""
    tile_r = tile // n_tiles_c
    tile_c = tile - tile_r * n_tiles_c
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows, rows < R, cols, cols < C, tile_c


TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
