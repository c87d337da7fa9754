"""Build the compiled backend's library (csrc/) ahead of time when torch and nvcc are at hand; install
without it otherwise.

Plain `pip install .` builds in an isolated environment without torch, so the library is skipped and
built on first use instead (dpkernels/ops/cuda/_build.py, cached). Build it here with
`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`) on a machine with torch
and CUDA_HOME set. DPKERNELS_CUDA=0 turns it off. A failing build never fails the install: the
library is then built on first use, or the backend reports why it is unavailable.
"""

import os
import shutil
import sys

from setuptools import setup

HOST = ["csrc/dpk_all.cpp"]  # every op family's host code, one translation unit (see it)
DEVICE = ["csrc/kernels.cu"]
GENCODE = ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]


def _build_helpers():
    """dpkernels/ops/cuda/_build.py loaded by path (the package itself is not imported here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dpk_build", "dpkernels/ops/cuda/_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_extension():
    if not os.path.exists(HOST[0]) or os.environ.get("DPKERNELS_CUDA", "1") in ("0", "cpu"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return [], {}
    ext = CUDAExtension(
        "dpkernels._C",
        HOST + DEVICE,
        library_dirs=_build_helpers().cuda_lib_dirs(),
        extra_compile_args={
            "cxx": ["-O3", "-DDPK_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *GENCODE],
        },
    )

    class Build(BuildExtension.with_options(no_python_abi_suffix=True)):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # the library is optional: built on first use instead
                print(
                    f"dpkernels: building the compiled backend failed ({exc}); it will be built on first use",
                    file=sys.stderr,
                )

    return [ext], {"build_ext": Build}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
