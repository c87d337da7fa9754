"""Build and load the compiled backend's library (csrc/): ahead of time by setup.py, or just in time.

`load` looks for the library setup.py built (``dpkernels/_C*.so``), else compiles csrc/ with
`torch.utils.cpp_extension.load` (ninja) into a persistent directory, ``$DPKERNELS_BUILD_DIR`` or
``~/.cache/dpkernels/build/<torch>-<cpu|cuda>-<source tree>``, so only the first load of a new source compiles.
With nvcc (CUDA_HOME) and a CUDA build of torch the library has the CUDA kernels (sm_90a, sm_80);
otherwise it is the CPU build (g++ only), whose ops serve CPU tensors and say so for CUDA ones.
DPKERNELS_CUDA=0 forbids building it, DPKERNELS_CUDA=cpu forces the CPU build.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CSRC = ROOT / "csrc"
HOST_SOURCES = ("dpk_all.cpp",)  # includes every op family's source (one translation unit: see it)
CUDA_SOURCES = ("kernels.cu",)
# sm_90a: Hopper's own instructions; sm_80: Ampere and, through its SASS, later parts.
GENCODE = ("-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80")
NVCC_FLAGS = ("-O3", "-lineinfo", "--expt-relaxed-constexpr", *GENCODE)

_loaded: dict[str, object] = {}


def nvcc() -> str | None:
    """The nvcc that would build the CUDA kernels, or None (no CUDA_HOME, no nvcc, or a CPU build of torch)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        return None
    return shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc"))


def cuda_lib_dirs() -> list[str]:
    """Directories that hold libcudart for the link: CUDA_HOME's lib64/lib, /usr/local/cuda's (CUDA_HOME
    may be /usr/local with nvcc a wrapper script), and the pip-installed runtime torch itself loads."""
    from torch.utils.cpp_extension import CUDA_HOME

    dirs = [os.path.join(r, sub) for r in (CUDA_HOME, "/usr/local/cuda") if r for sub in ("lib64", "lib")]
    try:
        import nvidia  # the CUDA runtime wheels torch depends on (nvidia/cu13/lib, nvidia/cuda_runtime/lib)

        dirs += [d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))]
    except ImportError:
        pass
    found: list[str] = []
    for d in dirs:
        if glob.glob(os.path.join(d, "libcudart.so*")) and os.path.realpath(d) not in map(os.path.realpath, found):
            found.append(d)
    return found


def with_cuda() -> bool:
    mode = os.environ.get("DPKERNELS_CUDA", "1")
    return mode not in ("0", "cpu") and nvcc() is not None


def build_dir(cuda: bool) -> Path:
    import torch

    base = os.environ.get("DPKERNELS_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dpkernels", "build"
    )
    # one directory per source tree: checkouts sharing a cache would overwrite each other's build files
    # and rebuild in turn
    tree = hashlib.sha1(str(CSRC).encode()).hexdigest()[:10]
    return Path(base) / f"torch{torch.__version__.replace('+', '_')}-{'cuda' if cuda else 'cpu'}-{tree}"


def prebuilt() -> str | None:
    """The library setup.py built into the package, if any."""
    found = sorted(glob.glob(str(ROOT / "dpkernels" / "_C*.so")))
    return found[0] if found else None


def load(verbose: bool = False) -> dict[str, object]:
    """Load the library once per process (building it if needed); returns how: path, cuda, build seconds."""
    if _loaded:
        return _loaded
    import torch

    if os.environ.get("DPKERNELS_CUDA", "1") == "0":
        raise RuntimeError("the compiled backend is turned off (DPKERNELS_CUDA=0)")
    path = prebuilt()
    t0 = time.perf_counter()
    if path is not None:
        torch.ops.load_library(path)
        cuda = True
    else:
        if not (CSRC / HOST_SOURCES[0]).exists():
            raise RuntimeError(f"no prebuilt dpkernels/_C library and no sources at {CSRC} to build it from")
        cuda = with_cuda()
        from torch.utils.cpp_extension import load as cpp_load

        directory = build_dir(cuda)
        directory.mkdir(parents=True, exist_ok=True)
        sources = [str(CSRC / s) for s in HOST_SOURCES + (CUDA_SOURCES if cuda else ())]
        cpp_load(
            name="dpkernels_C_cuda" if cuda else "dpkernels_C_cpu",
            sources=sources,
            extra_cflags=["-O3", *(["-DDPK_WITH_CUDA"] if cuda else [])],
            extra_cuda_cflags=list(NVCC_FLAGS),
            extra_ldflags=[f"-L{d}" for d in cuda_lib_dirs()] if cuda else [],
            build_directory=str(directory),
            with_cuda=cuda,
            is_python_module=False,
            verbose=verbose,
        )
        path = str(directory / ("dpkernels_C_cuda.so" if cuda else "dpkernels_C_cpu.so"))
    _loaded.update(path=path, cuda=cuda, seconds=time.perf_counter() - t0)
    return _loaded
