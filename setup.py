"""Build the optional CUDA extension (csrc/) when torch and nvcc are at hand; install without it otherwise.

Plain `pip install .` builds in an isolated environment without torch, so the extension is
skipped; build it with `pip install --no-build-isolation .` (or `python setup.py build_ext
--inplace`) on a machine with torch and CUDA_HOME set. DPKERNELS_CUDA=0 turns it off.
"""

import glob
import os
import shutil

from setuptools import setup


def cuda_extension():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources or os.environ.get("DPKERNELS_CUDA", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:
        return [], {}
    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return [], {}
    ext = CUDAExtension(
        "dpkernels._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-gencode=arch=compute_90,code=sm_90", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
