"""Compile every Triton kernel of dpkernels ahead of time for sm_90 (H100), with no GPU.

A registry (`registry()`) holds configurations of every kernel family at the shapes of the main
workloads (GPT-2 small: d = 768, p = 768 / 3072 / 50257, T = 256, B = 32; ResNet18's convs at 32x32;
an embedding of V = 50257), each run in bf16, fp16, fp32 (IEEE) and, where the family's tl.dot follows
torch's float32 matmul precision, TF32. For each, the real host launchers run on meta tensors with
`launch` replaced by a recorder, so what is compiled is exactly what they would launch (kernel,
argument types, the int specialisations Triton's JIT makes, constexprs, warps, stages). Identical
specialisations are compiled once, listed under the first configuration that launches them.

Each kernel is compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)).
Spills come from the log of the ptxas run triton itself makes (TRITON_DUMP_PTXAS_LOG; the cache
is bypassed so ptxas always runs); registers, local memory and static shared memory from the
cuobjdump bundled with triton on the cubin, plus triton's dynamic shared memory; its SASS says
whether tensor cores are used (HGMMA = Hopper wgmma, HMMA = mma.sync). Local memory without
spills is libdevice's sinf/cosf slow-path array (the Box-Muller of tl.randn), never reached for
its arguments in [0, 2 pi).

Exits 1 if a kernel does not compile, spills, needs more shared memory than an H100 block can have
(227 KiB), or its tensor-core use differs from `expected_mma` (16-bit and TF32 dots on tensor cores:
wgmma for tiles of >= 64 rows, mma.sync below; IEEE float32 on FMA units), or a kernel of the package
is launched by no configuration; the report lists each problem.

    python -m bench.aot_compile                    # the full registry, markdown table on stdout
    python -m bench.aot_compile --quick            # one main configuration per family, bf16 (CI)
    python -m bench.aot_compile --out FILE.md      # also the report (versions, command) as markdown
    python -m bench.aot_compile --json FILE.json   # also the rows as JSON
    python -m bench.aot_compile --recheck FILE.json  # re-check saved rows, compile nothing

TRITON_INTERPRET must be unset (the interpreter has no compiler); this module unsets it before
triton is imported, so run it as its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import pkgutil
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas and its log
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dpkernels.ops.triton import _common  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
H100_SMEM = 227 * 1024  # the most shared memory one block can have on sm_90 (opt-in dynamic)
MAX_REGS = 255
PTR_TYPES = {**_common.TL_DTYPES, torch.int32: "i32", torch.int64: "i64"}  # + the embedding ids
META = torch.device("meta")

# input dtype name -> (torch float32 matmul precision, dtype of the meta inputs)
PRECISIONS = {
    "bf16": ("highest", torch.bfloat16),
    "fp16": ("highest", torch.float16),
    "fp32": ("highest", torch.float32),  # IEEE dots: FMA units
    "tf32": ("high", torch.float32),  # float32 inputs, TF32 dots where the kernel follows torch
    "fp64": ("highest", torch.float64),  # on request only (tests, CPU reference work)
}
DEFAULT_DTYPES = ("bf16", "fp16", "fp32", "tf32")


# ----------------------------------------------------------------------------- recording launches


@dataclass
class Launch:
    kernel: Any
    num_warps: int
    num_stages: int
    signature: dict
    constexprs: dict
    attrs: dict
    meta: dict  # the launcher's constexpr keywords (the others in constexprs are ints equal to 1)
    family: str
    workload: str
    dtype: str
    maxnreg: int | None = None  # the launcher's register budget (PTX .maxnreg), None for ptxas's choice


def _specialize(kernel, args, meta) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attrs as Triton's JIT would derive them from these arguments."""
    names = kernel.arg_names
    positional = dict(zip(names, args, strict=False))
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in meta:
            signature[name] = "constexpr"
            constexprs[name] = meta[name]
            continue
        value = positional[name]
        if isinstance(value, torch.Tensor):
            ty, spec = "*" + PTR_TYPES[value.dtype], "D"  # torch's allocations are 16-byte aligned
        else:
            ty, spec = triton._C.libtriton.native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # ints equal to 1 and None
            constexprs[name] = spec
        elif spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


def _op_modules() -> list:
    pkg = importlib.import_module("dpkernels.ops.triton")
    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def all_kernels() -> set[str]:
    """Every @triton.jit function of dpkernels.ops.triton named *_kernel (the others are device helpers)."""
    return {
        name
        for mod in _op_modules()
        for name, obj in vars(mod).items()
        if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")
    }


@contextlib.contextmanager
def recording(out: list[Launch], family: str, workload: str, dtype: str) -> Iterator[None]:
    """Record the launches the host launchers make in the block, without launching (meta tensors)."""
    with _common.observe_launches(run=False) as seen:
        yield
    for x in seen:
        sig, const, attrs = _specialize(x.kernel, x.args, x.meta)
        meta = dict(x.meta)
        out.append(
            Launch(x.kernel, x.num_warps, x.num_stages, sig, const, attrs, meta, family, workload, dtype, x.maxnreg)
        )


@contextlib.contextmanager
def matmul_precision(prec: str) -> Iterator[None]:
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(prec)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Config:
    family: str
    workload: str
    run: Callable[[torch.dtype], object] = field(repr=False)  # calls the launchers on meta inputs of a dtype
    main: bool = False  # the family's main configuration: the --quick (CI) subset, in bf16
    tf32: bool = False  # the family's tl.dot follows torch's float32 matmul precision: a TF32 row

    def dtypes(self) -> tuple[str, ...]:
        return DEFAULT_DTYPES if self.tf32 else tuple(d for d in DEFAULT_DTYPES if d != "tf32")


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device=META, dtype=dtype)


NOISE = dict(noise_std=1.0, scale=0.5, seed_w=1 << 40, seed_b=1 << 41)
NO_NOISE = dict(noise_std=0.0, scale=0.5, seed_w=0, seed_b=0)

# (workload, B, T, d, p): GPT-2 small's Linear layers, and a T = 1 classifier head (16-row tiles)
LINEAR = [
    ("GPT-2 attn proj", 32, 256, 768, 768),
    ("GPT-2 MLP up", 32, 256, 768, 3072),
    ("GPT-2 MLP down", 32, 256, 3072, 768),
    ("GPT-2 LM head", 32, 256, 768, 50257),
    ("classifier head", 32, 1, 768, 10),
]
# (workload, B, C_in, C_out, spatial, kernel, stride, padding, groups): ResNet18 on 32x32 (CIFAR) inputs,
# a depthwise conv, a conv1d and a conv3d; bias=True everywhere (the kernels' largest variant)
CONV = [
    ("ResNet18 layer1 3x3", 32, 64, 64, (32, 32), 3, 1, 1, 1),
    ("ResNet18 stem 3x3", 32, 3, 64, (32, 32), 3, 1, 1, 1),
    ("ResNet18 layer2 3x3 s2", 32, 64, 128, (32, 32), 3, 2, 1, 1),
    ("ResNet18 downsample 1x1 s2", 32, 64, 128, (32, 32), 1, 2, 0, 1),
    ("ResNet18 layer4 3x3", 32, 512, 512, (4, 4), 3, 1, 1, 1),
    ("depthwise 3x3", 32, 64, 64, (32, 32), 3, 1, 1, 64),
    ("conv1d k=5", 32, 128, 256, (1000,), 5, 1, 2, 1),
    ("conv3d 3x3x3", 8, 16, 32, (16, 16, 16), 3, 1, 1, 1),
]


def _linear_configs() -> list[Config]:
    from dpkernels.ops.triton.affine import launch_sum_bound
    from dpkernels.ops.triton.linear_clipped_sum import launch_clipped_sum
    from dpkernels.ops.triton.linear_norms import (
        launch_bias_norms,
        launch_ghost,
        launch_ghost_bound,
        launch_inst,
        launch_inst_bound,
    )

    out = []
    for i, (name, B, T, d, p) in enumerate(LINEAR):
        label = f"{name} B={B} T={T} d={d} p={p}"

        def inputs(dt, B=B, T=T, d=d, p=p):
            return _t(B, T, d, dtype=dt), _t(B, T, p, dtype=dt)

        def ghost(dt, inputs=inputs):
            launch_ghost(*inputs(dt), True)

        def inst(dt, inputs=inputs):
            launch_inst(*inputs(dt), True)

        def csum(dt, inputs=inputs, B=B, d=d, p=p):
            a, g = inputs(dt)
            prev = dict(prev_w=_t(p, d), prev_b=_t(p))
            for splits in (4, 1):  # split-K (+ the finish kernel), and the fused epilogue
                launch_clipped_sum(a, g, _t(B), bias=True, splits=splits, **NOISE, **prev)
            launch_clipped_sum(a, g, _t(B), bias=True, splits=1, prev_w=None, prev_b=None, **NO_NOISE)

        def bias_norms(dt, inputs=inputs):
            launch_bias_norms(inputs(dt)[1])

        def bias_sum(dt, inputs=inputs, B=B, p=p):
            g = inputs(dt)[1]
            for splits in (4, 1):
                launch_clipped_sum(None, g, _t(B), bias=True, splits=splits, prev_w=None, prev_b=_t(p), **NOISE)

        def ghost_bound(dt, inputs=inputs):  # the certified norms: token norms, then the bound's tiles
            launch_ghost_bound(*inputs(dt))

        def inst_bound(dt, inputs=inputs):
            launch_inst_bound(*inputs(dt))

        def sum_bound(dt, inputs=inputs):  # the bias's, and the affine weight's (x * g)
            a, g = inputs(dt)
            launch_sum_bound(g, g, False)
            launch_sum_bound(g, g, True)

        main = i == 0
        out += [
            Config("linear ghost bound", label, ghost_bound, main, tf32=True),
            Config("linear inst bound", label, inst_bound, main, tf32=True),
            Config("bias / affine bound", label, sum_bound, main),
            Config("linear ghost norms", label, ghost, main, tf32=True),
            Config("linear inst norms", label, inst, main, tf32=True),
            Config("linear clipped sum", label, csum, main, tf32=True),
            Config("bias norms", label, bias_norms, main),
            Config("bias clipped sum", label, bias_sum, main),
        ]

    def wide(dt, B=1, T=256, d=8192, p=262144):  # p * d = 2**31: int64 offsets in the epilogue
        a, g = _t(B, T, d, dtype=dt), _t(B, T, p, dtype=dt)
        for splits in (4, 1):
            launch_clipped_sum(a, g, _t(B), bias=False, splits=splits, prev_w=_t(p, d), prev_b=None, **NOISE)

    label = "LM head of 2**31 weights B=1 T=256 d=8192 p=262144 (int64 offsets)"
    out.append(Config("linear clipped sum", label, wide, tf32=True))
    return out


def _add_noise_configs() -> list[Config]:
    from dpkernels.ops.triton.add_noise import finish

    def noise(shape, prev):
        def run(dt):  # the add_noise op: finish with no parts, output in the parameter's dtype
            finish(None, _t(*shape, dtype=dt) if prev else None, _t(*shape, dtype=dt), noise_std=1.0, scale=0.5, seed=3)

        return run

    return [
        Config("add_noise", "GPT-2 attn proj weight 768x768, prev", noise((768, 768), True), main=True),
        Config("add_noise", "GPT-2 LM head weight 50257x768", noise((50257, 768), False)),
        Config("add_noise", "2**31 elements (int64 offsets), prev", noise((1 << 16, 1 << 15), True)),
    ]


def _secure_noise_configs() -> list[Config]:
    from dpkernels.ops.triton.secure_noise import launch_secure_noise

    def noise(shape, prev):
        def run(dt):  # the engine's use: the float32 clipped sum as prev, output in the parameter's dtype
            p = _t(*shape) if prev else None
            launch_secure_noise(p, _t(*shape, dtype=dt), noise_std=1.0, scale=0.5, key=[1 << 31] * 8, nonce=[5, 7, 0])

        return run

    return [
        Config("secure noise", "GPT-2 attn proj weight 768x768, prev", noise((768, 768), True), main=True),
        Config("secure noise", "GPT-2 LM head weight 50257x768", noise((50257, 768), False)),
    ]


def _embedding_configs() -> list[Config]:
    from dpkernels.ops.triton import embedding as E

    V, D = 50257, 768

    def norms(B, T, method, ids_dtype=torch.int64, pad=None):
        def run(dt):
            E.launch_norms(_t(B, T, dtype=ids_dtype), _t(B, T, D, dtype=dt), V, pad, method)

        return run

    def csum(B, T, V, D):
        def run(dt):
            ids, g = _t(B, T, dtype=torch.int64), _t(B, T, D, dtype=dt)
            E.launch_clipped_sum(ids, g, _t(B), V, None, 1.0, 0.5, 1 << 40, _t(V, D))
            E.launch_clipped_sum(ids, g, _t(B), V, 0, 0.0, 0.5, 0, None)

        return run

    def bound(B, T, pad=None):  # the certified norm: float64 run sums (sorted ids past one 64-token tile)
        def run(dt):
            E.launch_norms_bound(_t(B, T, dtype=torch.int64), _t(B, T, D, dtype=dt), V, pad)

        return run

    def cross(B, T, pad=None):
        def run(dt):
            ids = _t(B, T, dtype=torch.int64)
            E.launch_cross(ids, _t(B, T, D, dtype=dt), _t(B, T, D, dtype=dt), _t(B, T, V, dtype=dt), pad)

        return run

    wte = f"GPT-2 wte V={V} D={D} B=32"
    return [
        Config("embedding norms (gram)", f"{wte} T=64", norms(32, 64, "gram"), main=True),
        Config("embedding norms (gram)", f"{wte} T=16, padding_idx", norms(32, 16, "gram", pad=0)),
        Config("embedding norms (scan)", f"{wte} T=256", norms(32, 256, "scan"), main=True),
        Config(
            "embedding norms (scan)", f"{wte} T=256, int32 ids, padding_idx", norms(32, 256, "scan", torch.int32, 0)
        ),
        Config("embedding norms bound", f"{wte} T=256", bound(32, 256), main=True),
        Config("embedding norms bound", f"{wte} T=64, padding_idx", bound(32, 64, 0)),
        Config("embedding clipped sum", f"{wte} T=256", csum(32, 256, V, D), main=True),
        Config("embedding clipped sum", "V=1048576 D=2048 B=32 T=256 (int64 offsets)", csum(32, 256, 1 << 20, 2048)),
        Config("embedding cross (tied head)", f"{wte} T=256", cross(32, 256), main=True, tf32=True),
        Config("embedding cross (tied head)", f"{wte} T=64, padding_idx", cross(32, 64, 0), tf32=True),
    ]


def _affine_configs() -> list[Config]:
    from dpkernels.ops.triton import affine as A

    def rows(B, T, C, channels_first, dt):
        if channels_first:  # GroupNorm's (B, C, H*W) seen as (B, T, C): channel stride T
            return _t(B, C, T, dtype=dt).transpose(1, 2)
        return _t(B, T, C, dtype=dt)

    def norms(B, T, C, channels_first=False, bias=True):
        def run(dt):
            x = rows(B, T, C, channels_first, dt)
            A.launch_norms(x, x, True, bias)

        return run

    def csum(B, T, C, channels_first=False, bias=True):
        def run(dt):
            x = rows(B, T, C, channels_first, dt)
            prev = dict(prev_w=_t(C), prev_b=_t(C) if bias else None)
            for splits in (4, 1):  # the row split (+ the finish kernel), and the fused epilogue
                A.launch_clipped_sum(x, x, _t(B), weight=True, bias=bias, splits=splits, **NOISE, **prev)
            A.launch_clipped_sum(x, x, _t(B), weight=True, bias=bias, splits=1, prev_w=None, prev_b=None, **NO_NOISE)

        return run

    cases = [
        ("GPT-2 LayerNorm B=32 T=256 C=768", (32, 256, 768), {}),
        ("ResNet18 GroupNorm layer1 B=32 C=64 32x32 (channels first)", (32, 1024, 64), dict(channels_first=True)),
        ("RMSNorm B=32 T=256 C=768 (no bias)", (32, 256, 768), dict(bias=False)),
    ]
    out = []
    for i, (label, shape, kw) in enumerate(cases):
        out.append(Config("affine norms", label, norms(*shape, **kw), main=i == 0))
        out.append(Config("affine clipped sum", label, csum(*shape, **kw), main=i == 0))
    return out


def _conv_configs() -> list[Config]:
    from dpkernels.ops.triton import conv as C

    out = []
    for i, (name, B, ci, co, S, k, s, p, gr) in enumerate(CONV):
        n = len(S)
        So = tuple((v + 2 * p - k) // s + 1 for v in S)
        label = f"{name} B={B} {ci}->{co}" + (f" groups={gr}" if gr > 1 else "") + f" {'x'.join(map(str, S))}"
        geo = ([k] * n, [s] * n, [p] * n, [1] * n, gr)

        def inputs(dt, B=B, ci=ci, co=co, S=S, So=So):
            return _t(B, ci, *S, dtype=dt), _t(B, co, *So, dtype=dt)

        def ghost(dt, inputs=inputs, geo=geo):
            C.launch_ghost(*inputs(dt), *geo, True)

        def inst(dt, inputs=inputs, geo=geo):
            C.launch_inst(*inputs(dt), *geo, True)

        def csum(dt, inputs=inputs, B=B, ci=ci, co=co, k=k, s=s, p=p, gr=gr, n=n):
            x, g = inputs(dt)
            ws = (co, ci // gr, *[k] * n)
            kw = dict(weight_shape=ws, stride=s, padding=p, dilation=1, groups=gr, bias=True)
            prev = dict(prev_w=_t(*ws), prev_b=_t(co))
            for splits in (4, 1):  # split-K (+ the finish kernel), and the fused epilogue
                C.launch_clipped_sum(x, g, _t(B), splits=splits, **kw, **NOISE, **prev)
            C.launch_clipped_sum(x, g, _t(B), splits=1, prev_w=None, prev_b=None, **kw, **NO_NOISE)

        main = i == 0
        out += [
            Config("conv ghost norms", label, ghost, main, tf32=True),
            Config("conv inst norms", label, inst, main, tf32=True),
            Config("conv clipped sum", label, csum, main, tf32=True),
        ]
    return out


def registry() -> list[Config]:
    """Every configuration, grouped by family, the family's main configuration first."""
    configs = _linear_configs() + _add_noise_configs() + _secure_noise_configs() + _embedding_configs()
    configs += _affine_configs() + _conv_configs()
    order = list(dict.fromkeys(c.family for c in configs))
    return sorted(configs, key=lambda c: order.index(c.family))  # stable: each family's own order kept


def launches(configs: list[Config], dtypes: list[str] | None) -> list[Launch]:
    """The distinct launches of ``configs`` in their dtypes (``dtypes`` None: each config's own)."""
    out: list[Launch] = []
    for cfg in configs:
        for name in dtypes if dtypes is not None else cfg.dtypes():
            if name == "tf32" and not cfg.tf32:
                continue  # no tl.dot that follows torch's precision: the fp32 kernels
            prec, dt = PRECISIONS[name]
            with matmul_precision(prec), recording(out, cfg.family, cfg.workload, name):
                cfg.run(dt)
    seen, unique = set(), []
    for x in out:
        if _key(x) not in seen:
            seen.add(_key(x))
            unique.append(x)
    return unique


def _key(x: Launch):
    const = tuple(sorted((k, str(v)) for k, v in x.constexprs.items()))
    attrs = tuple(sorted((k, str(v)) for k, v in x.attrs.items()))
    return (x.kernel.__name__, tuple(x.signature.items()), const, attrs, x.num_warps, x.num_stages, x.maxnreg)


# ----------------------------------------------------------------------------- expectations

# kernel -> the constexpr that is the row count (M) of its tl.dot's tile; kernels not named have no tl.dot
DOT_ROWS = {
    "_ghost_kernel": "BLOCK_T",
    "_inst_kernel": "BLOCK_P",
    "_clipped_sum_kernel": "BLOCK_P",
    "_conv_ghost_kernel": "BLOCK_T",
    "_conv_inst_kernel": "BLOCK_P",
    "_conv_clipped_sum_kernel": "BLOCK_P",
    "_embedding_gram_kernel": "BLOCK_T",
    "_embedding_scan_kernel": "BLOCK_T",
    "_embedding_cross_kernel": "BLOCK_S",
    "_embedding_clipped_sum_kernel": "BLOCK_V",
    "_ghost_bound_kernel": "BLOCK_T",
    "_inst_bound_kernel": "BLOCK_P",
}


def expected_mma(x: Launch) -> str:
    """The tensor-core instruction a kernel should compile to: a tl.dot of 16-bit operands, or of float32
    ones with input_precision "tf32", runs on tensor cores, as wgmma (HGMMA) when its tile has >= 64 rows
    on a multiple of 4 warps (one warpgroup per 64 rows) and as mma.sync (HMMA) below; IEEE float32 dots
    (those with no PRECISION constexpr are IEEE: the embedding norms and the one-hot sum) run on FMA units."""
    rows = DOT_ROWS.get(x.kernel.__name__)
    if rows is None or x.meta.get("HAS_WEIGHT", True) is False:  # the bias-only clipped sum has no dot
        return "none"
    dot = str(x.meta.get("DOT", x.meta.get("ACC")))  # str(tl.bfloat16) == "bf16"
    tc = dot in ("fp16", "bf16") or (dot == "fp32" and x.meta.get("PRECISION") == "tf32")
    if not tc:
        return "none"
    return "HGMMA" if x.meta[rows] >= 64 and x.num_warps % 4 == 0 else "HMMA"


# ----------------------------------------------------------------------------- compiling


@dataclass
class Row:
    family: str
    kernel: str
    workload: str
    config: str  # the launcher's constexprs
    dtype: str
    warps: int
    stages: int
    regs: int
    local_bytes: int
    spill_bytes: int  # ptxas: spill stores + spill loads
    smem_bytes: int
    tensor_cores: str  # HGMMA, HMMA, both or none, from the SASS
    expected_tensor_cores: str
    compile_s: float


def _describe(x: Launch) -> str:
    """The block sizes, warps-independent shape constexprs, the flags that are set and a register budget."""
    parts = []
    for k, v in x.meta.items():
        if isinstance(v, bool):
            if v:
                parts.append(k)
        elif isinstance(v, int) or k in ("DOT", "PRECISION") or (k == "ACC" and str(v) == "fp64"):
            parts.append(f"{k}={v}")
    if x.maxnreg is not None:
        parts.append(f"maxnreg={x.maxnreg}")
    return " ".join(parts)


def compile_one(x: Launch, workdir: Path) -> Row:
    t0 = time.perf_counter()
    src = ASTSource(x.kernel, x.signature, x.constexprs, x.attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        options = {"num_warps": x.num_warps, "num_stages": x.num_stages}
        if x.maxnreg is not None:
            options["maxnreg"] = x.maxnreg
        ck = triton.compile(src, target=TARGET, options=options)
    dt = time.perf_counter() - t0
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if not found:
        raise RuntimeError(f"no ptxas log for {x.kernel.__name__} (was ptxas skipped?):\n{log.getvalue()}")
    spill = sum(int(a) + int(b) for a, b in found)
    cubin = workdir / f"{x.kernel.__name__}.cubin"
    cubin.write_bytes(ck.asm["cubin"])
    res = subprocess.run([BIN / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output for {x.kernel.__name__}:\n{res}")
    regs, stack, shared, local = (int(v) for v in m.groups())
    mma = [k for k in ("HGMMA", "HMMA") if re.search(rf"\b{k}\b", sass)]
    return Row(
        family=x.family,
        kernel=x.kernel.__name__,
        workload=x.workload,
        config=_describe(x),
        dtype=x.dtype,
        warps=x.num_warps,
        stages=x.num_stages,
        regs=regs,
        local_bytes=local + stack,
        spill_bytes=spill,
        smem_bytes=shared + int(ck.metadata.shared),
        tensor_cores="/".join(mma) or "none",
        expected_tensor_cores=expected_mma(x),
        compile_s=round(dt, 2),
    )


def problems(rows: list[dict], smem_limit: int = H100_SMEM) -> list[str]:
    """What is wrong with compiled kernels: spills, registers or shared memory past sm_90's limits, or
    tensor-core use other than expected."""
    out = []
    for r in rows:
        where = f"{r['kernel']} [{r['family']}: {r['workload']}, {r['dtype']}, {r['config']}]"
        if r["spill_bytes"]:
            out.append(f"{where} spills {r['spill_bytes']} bytes")
        if r["regs"] > MAX_REGS:
            out.append(f"{where} uses {r['regs']} registers a thread (> {MAX_REGS})")
        if r["smem_bytes"] > smem_limit:
            out.append(f"{where} needs {r['smem_bytes']} B of shared memory (> {smem_limit} B a block)")
        if r["tensor_cores"] != r["expected_tensor_cores"]:
            out.append(f"{where} compiles to tensor cores {r['tensor_cores']}, expected {r['expected_tensor_cores']}")
    return out


# ----------------------------------------------------------------------------- reports


def markdown(rows: list[dict]) -> str:
    cols = ["family", "kernel", "configuration", "dtype", "warps", "stages", "regs", "spill B", "smem B", "local B"]
    lines = ["| " + " | ".join([*cols, "tensor cores"]) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        tc = r["tensor_cores"]
        if tc != r["expected_tensor_cores"]:
            tc += f" (expected {r['expected_tensor_cores']})"
        lines.append(
            f"| {r['family']} | {r['kernel']} | {r['workload']}: {r['config']} | {r['dtype']} | {r['warps']} | "
            f"{r['stages']} | {r['regs']} | {r['spill_bytes']} | {r['smem_bytes']} | {r['local_bytes']} | {tc} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line a family: the workloads its rows are listed under (a specialisation is listed once), its
    dtypes, kernels, and the worst of each measure."""
    cols = ["family", "workloads listed", "dtypes", "kernels compiled", "max regs", "max smem B", "spilling"]
    lines = ["| " + " | ".join([*cols, "tensor cores"]) + " |", "|" + "---|" * (len(cols) + 1)]
    for fam in dict.fromkeys(r["family"] for r in rows):
        rs = [r for r in rows if r["family"] == fam]
        dts = [d for d in PRECISIONS if any(r["dtype"] == d for r in rs)]
        tcs = sorted({r["tensor_cores"] for r in rs})
        lines.append(
            f"| {fam} | {len({r['workload'] for r in rs})} | {', '.join(dts)} | {len(rs)} | "
            f"{max(r['regs'] for r in rs)} | {max(r['smem_bytes'] for r in rs)} | "
            f"{sum(r['spill_bytes'] > 0 for r in rs)} | {', '.join(tcs)} |"
        )
    return "\n".join(lines)


def sources_digest() -> str:
    """A short sha256 of the Triton backend's sources: which code a saved report describes."""
    h = hashlib.sha256()
    for f in sorted(Path(_common.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def _ptxas_version() -> str:
    out = subprocess.run([BIN / "ptxas", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\S+?),", out)
    return m.group(1) if m else "unknown"


def report(rows: list[dict], issues: list[str], command: str, seconds: float, sources: str) -> str:
    n_tc = sum(r["tensor_cores"] != "none" for r in rows)
    result = f"**{len(issues)} problems** (listed below the summary)" if issues else "every kernel within the limits"
    lines = [
        "# Ahead-of-time sm_90 (H100) compile report of the Triton kernels",
        "",
        "**A compile-time report: no kernel was run and no GPU was used.** The Triton host launchers of",
        "`dpkernels/ops/triton/` ran on meta tensors for the configurations of `bench/aot_compile.py`'s registry",
        "(GPT-2 small's Linear, LayerNorm and embedding layers, ResNet18's convs at 32x32, and a few more), and",
        "every kernel they launch was compiled by `triton.compile` for `GPUTarget('cuda', 90, 32)`. Registers and",
        "shared memory are the cubin's (cuobjdump), spills what ptxas reports, tensor cores what the SASS holds.",
        "Run times, occupancy on a real H100 and numerical results are not measured here.",
        "",
        f"- command: `{command}`",
        f"- versions: triton {triton.__version__}, torch {torch.__version__}, ptxas {_ptxas_version()} (triton's own)",
        f"- sources: `{sources}`, the first 12 hex digits of `sources_digest()` (sha256 of dpkernels/ops/triton/*.py)",
        f"- {len(rows)} distinct kernel specialisations, compiled in {seconds:.0f} s on a CPU; a specialisation that",
        "  several configurations launch is compiled once and listed under the first of them",
        f"- checked: no spills; <= {MAX_REGS} registers a thread; shared memory <= {H100_SMEM} B (227 KiB, an H100",
        "  block's maximum); tensor cores as expected: 16-bit and TF32 dots on wgmma (HGMMA) for tiles of >= 64",
        "  rows and mma.sync (HMMA) below, IEEE float32 dots and kernels without tl.dot on none",
        f"- result: {result}; {n_tc} kernels on tensor cores; at most "
        f"{max((r['regs'] for r in rows), default=0)} registers a thread and "
        f"{max((r['smem_bytes'] for r in rows), default=0)} B of shared memory",
        "- dtype: the layer inputs' dtype (accumulation is float32); tf32: float32 inputs under",
        "  `torch.set_float32_matmul_precision('high')`, listed for the kernels whose tl.dot follows it",
        "- local B: local memory without spills is libdevice's sinf/cosf slow-path array in the Box-Muller of",
        "  tl.randn (the noise epilogues), never reached for its arguments in [0, 2 pi)",
        "",
    ]
    if issues:
        lines += [f"- problem: {p}" for p in issues] + [""]
    return "\n".join([*lines, "## By family", "", summary(rows), "", "## Every kernel", "", markdown(rows), ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.aot_compile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="the main configuration of each family, in bf16")
    ap.add_argument("--dtypes", help=f"a comma list of {list(PRECISIONS)} (default: bf16 with --quick, else all)")
    ap.add_argument("--only", help="only the families whose name contains this")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    ap.add_argument("--json", type=Path, help="also write the rows (and the registry's families) as JSON here")
    ap.add_argument("--smem-limit", type=int, default=H100_SMEM, help="bytes of shared memory a block may have")
    ap.add_argument("--recheck", type=Path, help="check the rows of a --json file again; compile nothing")
    args = ap.parse_args(argv)

    if args.recheck:
        issues = problems(json.loads(args.recheck.read_text())["rows"], args.smem_limit)
        print("\n".join(issues) or "no problems", file=sys.stderr if issues else sys.stdout)
        return 1 if issues else 0

    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16"] if args.quick else None)
    if dtypes and (unknown := set(dtypes) - set(PRECISIONS)):
        ap.error(f"unknown --dtypes {sorted(unknown)}; choose from {list(PRECISIONS)}")
    configs = [c for c in registry() if (c.main or not args.quick) and (args.only or "") in c.family]
    if not configs:
        ap.error(f"no family matches --only {args.only!r}")
    t0 = time.perf_counter()
    sources = sources_digest()  # before the launchers run: the code they compile
    todo = launches(configs, dtypes)
    rows, issues = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, x in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {x.kernel.__name__} {x.family}: {x.workload} {x.dtype}", file=sys.stderr)
            try:
                rows.append(asdict(compile_one(x, Path(tmp))))
            except Exception as e:  # a kernel that does not compile is a finding: report it, go on
                root: BaseException = e
                while root.__cause__ is not None or root.__context__ is not None:  # triton chains the cause
                    root = root.__cause__ or root.__context__  # type: ignore[assignment]
                at = str(e).split("\n", 1)[0]  # "at line:col:" of the kernel's source
                why = f"{at} {type(root).__name__}: {str(root).strip()}"
                where = f"{x.kernel.__name__} [{x.family}: {x.workload}, {x.dtype}, {_describe(x)}]"
                issues.append(f"{where} does not compile for sm_90: {why}")
    seconds = time.perf_counter() - t0
    issues += problems(rows, args.smem_limit)
    uncovered = set() if args.only else all_kernels() - {x.kernel.__name__ for x in todo}
    issues += [f"{k} is not compiled by any configuration; add one to bench/aot_compile.py" for k in sorted(uncovered)]
    command = "python -m bench.aot_compile" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = report(rows, issues, command, seconds, sources)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        families = sorted({c.family for c in configs})
        payload = dict(triton=triton.__version__, torch=torch.__version__, families=families, rows=rows)
        payload["kernels"] = sorted(all_kernels())
        payload["sources"] = sources
        payload["problems"] = issues
        args.json.write_text(json.dumps(payload, indent=1))
    for p in issues:
        print(f"aot_compile: {p}", file=sys.stderr)
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
