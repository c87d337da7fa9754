"""Compile every Triton kernel of dpkernels ahead of time for sm_90 (H100), with no GPU.

For each configuration the real host launchers run on meta tensors with `launch` replaced by a
recorder, so what is compiled is exactly what they would launch (kernel, argument types, the
int specialisations Triton's JIT makes, constexprs, warps, stages). Each kernel is compiled
with triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)). Spills come from the
log of the ptxas run triton itself makes (TRITON_DUMP_PTXAS_LOG; the cache is bypassed so ptxas
always runs); registers, local memory and shared memory from the cuobjdump bundled with triton
on the cubin; its SASS says whether tensor cores are used (HGMMA = Hopper wgmma, HMMA =
mma.sync). Local memory without spills is libdevice's sinf/cosf slow-path array (the
Box-Muller of tl.randn), never reached for its arguments in [0, 2 pi).

    python bench/aot_compile.py                  # markdown table on stdout
    python bench/aot_compile.py --json out.json  # also the rows as JSON
    python bench/aot_compile.py --quick          # one shape per op (the test's set)

TRITON_INTERPRET must be unset (the interpreter has no compiler); this script unsets it,
so run it as its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas and its log
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dpkernels.ops.triton._common import TL_DTYPES  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass
class Launch:
    kernel: object
    num_warps: int
    num_stages: int
    signature: dict
    constexprs: dict
    attrs: dict
    label: str


@dataclass
class Row:
    kernel: str
    config: str
    warps: int
    stages: int
    regs: int
    local_bytes: int
    spill_bytes: int  # ptxas: spill stores + spill loads
    smem_bytes: int
    tensor_cores: str
    compile_s: float


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
            ty, spec = "*" + TL_DTYPES[value.dtype], "D"  # torch's allocations are 16-byte aligned
        else:
            ty, spec = triton._C.libtriton.native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # ints equal to 1 and None
            constexprs[name] = spec
        elif spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


@contextlib.contextmanager
def recording(out: list[Launch], label: str):
    """Replace `launch` in every op module (each imports it from _common) by a recorder for the duration."""
    pkg = importlib.import_module("dpkernels.ops.triton")
    names = [m.name for m in pkgutil.iter_modules(pkg.__path__)]
    mods = [mod for n in names if hasattr(mod := importlib.import_module(f"{pkg.__name__}.{n}"), "launch")]
    saved = [m.launch for m in mods]

    def record(kernel, grid, *args, num_warps=4, num_stages=2, **meta):
        sig, const, attrs = _specialize(kernel, args, meta)
        out.append(Launch(kernel, num_warps, num_stages, sig, const, attrs, label))

    for m in mods:
        m.launch = record
    try:
        yield
    finally:
        for m, f in zip(mods, saved, strict=False):
            m.launch = f


PRECISIONS = {  # name -> (torch float32 matmul precision, input dtype)
    "fp32": ("highest", torch.float32),
    "fp32+tf32": ("high", torch.float32),
    "bf16": ("highest", torch.bfloat16),
    "fp16": ("highest", torch.float16),
    "fp64": ("highest", torch.float64),
}
DEFAULT = ["fp32", "fp32+tf32", "bf16", "fp16"]  # fp64 (tests, CPU reference work) on request


def configurations(quick: bool, names: list[str]) -> list[Launch]:
    """The launches of the main configurations: GPT-2-small-like layers in each input dtype."""
    from dpkernels.ops.triton.add_noise import finish
    from dpkernels.ops.triton.linear_clipped_sum import launch_clipped_sum
    from dpkernels.ops.triton.linear_norms import launch_bias_norms, launch_ghost, launch_inst

    meta = torch.device("meta")
    shapes = [(32, 256, 768, 768)] if quick else [(32, 256, 768, 768), (8, 1024, 768, 3072), (64, 1, 64, 10)]
    out: list[Launch] = []
    for name in names:
        prec, dt = PRECISIONS[name]
        torch.set_float32_matmul_precision(prec)
        for B, T, d, p in shapes:
            a = torch.empty(B, T, d, device=meta, dtype=dt)
            g = torch.empty(B, T, p, device=meta, dtype=dt)
            c = torch.empty(B, device=meta)
            prev_w = torch.empty(p, d, device=meta)
            prev_b = torch.empty(p, device=meta)
            label = f"{name} B={B} T={T} d={d} p={p}"
            with recording(out, label):
                launch_ghost(a, g, True)
                launch_inst(a, g, True)
                # the planner's choice (split-K here), and the fused epilogue with and without noise
                for splits, noise in ((None, 1.0), (1, 1.0), (1, 0.0)):
                    launch_clipped_sum(
                        a,
                        g,
                        c,
                        bias=True,
                        noise_std=noise,
                        scale=0.5,
                        seed_w=1 << 40,
                        seed_b=1 << 41,
                        prev_w=prev_w,
                        prev_b=prev_b,
                        splits=splits,
                    )
                if name != "fp32+tf32":  # no dot: the same kernels as fp32
                    launch_bias_norms(g)
                    launch_clipped_sum(
                        None,
                        g,
                        c,
                        bias=True,
                        noise_std=1.0,
                        scale=0.5,
                        seed_w=0,
                        seed_b=1 << 41,
                        prev_w=None,
                        prev_b=prev_b,
                    )
    torch.set_float32_matmul_precision("highest")
    with recording(out, "add_noise fp32"):
        finish(
            None,
            torch.empty(768, 768, device=meta),
            torch.empty(768, 768, device=meta),
            noise_std=1.0,
            scale=0.5,
            seed=1 << 40,
        )
    return out


def _key(x: Launch):
    const = tuple(sorted((k, str(v)) for k, v in x.constexprs.items()))
    return (x.kernel.__name__, tuple(x.signature.items()), const, x.num_warps, x.num_stages)


def _describe(x: Launch) -> str:
    shown = ["ACC", "DOT", "PRECISION", "BLOCK_T", "BLOCK_K", "BLOCK_P", "BLOCK_D", "SPLIT", "HAS_WEIGHT", "HAS_NOISE"]
    parts = [f"{k}={str(x.constexprs[k]).replace('triton.language.', '')}" for k in shown if k in x.constexprs]
    dts = sorted({t for t in x.signature.values() if t.startswith("*")})
    return f"{x.label}: {' '.join(parts)} ptrs={','.join(dts)}"


def compile_one(x: Launch, workdir: Path) -> Row:
    t0 = time.perf_counter()
    src = ASTSource(x.kernel, x.signature, x.constexprs, x.attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        ck = triton.compile(src, target=TARGET, options={"num_warps": x.num_warps, "num_stages": x.num_stages})
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
        kernel=x.kernel.__name__,
        config=_describe(x),
        warps=x.num_warps,
        stages=x.num_stages,
        regs=regs,
        local_bytes=local + stack,
        spill_bytes=spill,
        smem_bytes=shared + int(ck.metadata.shared),
        tensor_cores="/".join(mma) or "none",
        compile_s=round(dt, 2),
    )


def markdown(rows: list[Row]) -> str:
    head = "| kernel | configuration | warps | stages | regs | local B | spill B | smem B | tensor cores |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {r.config} | {r.warps} | {r.stages} | {r.regs} | {r.local_bytes} | "
            f"{r.spill_bytes} | {r.smem_bytes} | {r.tensor_cores} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="one shape per op and dtype")
    ap.add_argument("--dtypes", default=",".join(DEFAULT), help=f"a comma list of {list(PRECISIONS)}")
    args = ap.parse_args(argv)
    names = args.dtypes.split(",")
    if unknown := set(names) - set(PRECISIONS):
        ap.error(f"unknown --dtypes {sorted(unknown)}; choose from {list(PRECISIONS)}")
    launches, seen = [], set()
    for x in configurations(args.quick, names):
        if _key(x) not in seen:
            seen.add(_key(x))
            launches.append(x)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [compile_one(x, Path(tmp)) for x in launches]
    print(f"Triton {triton.__version__}, target sm_{TARGET.arch} (no GPU needed), {len(rows)} kernels\n")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
