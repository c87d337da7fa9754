"""What every Triton op shares: the op namespace, input checks, block sizes and the one launch point.

Every kernel is launched through `launch`, so that ``bench/aot_compile.py`` can record
exactly what a launcher would run (kernel, argument types, constexprs, warps, stages)
by replacing it, and compile that ahead of time for sm_90 with no GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
from torch import Tensor

from ..reference._common import acc_dtype  # noqa: F401  (re-exported: the ops accumulate as the reference)

NS = "dpkernels"  # the one torch.library namespace of every dpkernels op
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SEED_MASK = (1 << 63) - 1  # seeds are 63-bit, as in the reference's `gaussian`


def interpreting(kernel: Any) -> bool:
    """Whether ``kernel`` runs in Triton's CPU interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, num_warps: int = 4, num_stages: int = 2, **meta: Any):
    """``kernel[grid](*args, **meta)``, after checking that the tensors can reach the kernel."""
    if not interpreting(kernel):
        for x in args:
            if isinstance(x, Tensor) and x.device.type != "cuda":
                raise RuntimeError(
                    f"dpkernels triton backend: {kernel.__name__} got a {x.device.type} tensor; Triton kernels run on "
                    "CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set before triton is imported). "
                    "Use dpkernels.set_backend('reference') for CPU tensors."
                )
    kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **meta)


def common_input(op: str, *tensors: Tensor) -> torch.dtype:
    """The one floating dtype the dot operands are cast to (tl.dot needs equal operand types)."""
    for t in tensors:
        if t.dtype not in FLOATS:
            raise TypeError(f"{op}: inputs must be float16, bfloat16, float32 or float64, got {t.dtype}")
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def check_rows(op: str, a: Tensor | None, g: Tensor, c: Tensor | None = None) -> None:
    """a: (B, T, d), g: (B, T, p), c: (B,), all on one device; errors say which argument is wrong."""
    if g.dim() != 3:
        raise ValueError(f"{op}: g must be (B, T, p), got shape {tuple(g.shape)}; reshape with batch_rows first")
    if a is not None:
        if a.dim() != 3 or a.shape[:2] != g.shape[:2]:
            raise ValueError(
                f"{op}: a must be (B, T, d) with the (B, T) of g {tuple(g.shape[:2])}, got shape {tuple(a.shape)}"
            )
        if a.device != g.device:
            raise ValueError(f"{op}: a is on {a.device} but g on {g.device}; move both to one device")
    if c is not None:
        if c.shape != (g.shape[0],):
            raise ValueError(
                f"{op}: c must hold one clip factor per sample, shape ({g.shape[0]},), got {tuple(c.shape)}"
            )
        if c.device != g.device:
            raise ValueError(f"{op}: c is on {c.device} but g on {g.device}; move both to one device")


def check_prev(op: str, name: str, prev: Tensor | None, shape: tuple[int, ...], device: torch.device) -> None:
    if prev is None:
        return
    if tuple(prev.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have the output's shape {tuple(shape)}, got {tuple(prev.shape)}")
    if prev.device != device:
        raise ValueError(f"{op}: {name} is on {prev.device} but the inputs on {device}; move it to their device")


def block(n: int, lo: int, hi: int) -> int:
    """The power of two covering ``n``, clamped to [lo, hi] (tl.dot needs every dimension >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: TF32 for float32 only where torch's own matmuls may use it
    (torch.set_float32_matmul_precision "high"/"medium"), so the kernel rounds like the reference's
    matmul on the same GPU; "ieee" otherwise (and for the 16-bit and float64 types, where it is moot)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def dot_operand(kernel: Any, dtype: torch.dtype):
    """The dtype tl.dot's operands are cast to: the input dtype, except bfloat16 under the interpreter,
    whose tl.dot multiplies bf16 bit patterns as integers (triton 3.8 keeps bf16 as uint16 in numpy).
    There float32 stands in: a product of two bf16 values is exact in fp32, so an fp32-accumulated
    dot gives the tensor-core result up to summation order."""
    import triton.language as tl

    if dtype == torch.bfloat16 and interpreting(kernel):
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}.get(dtype, tl.float64)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; an H100's 132 elsewhere (interpreter, meta, AOT)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
