"""Build (or find) the compiled backend's library and list its ops: ``python -m dpkernels.ops.cuda.build``.

CI runs it before the tests, so the build's time is reported once and the tests find it built.
"""

from __future__ import annotations

import sys


def main() -> int:
    import torch

    from ._build import load

    info = load(verbose="-v" in sys.argv)
    ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("dpkernels::cuda_"))
    kind = "with CUDA kernels (sm_90a, sm_80)" if info["cuda"] else "CPU only (no nvcc)"
    print(f"dpkernels compiled backend: {info['path']} {kind}, loaded in {info['seconds']:.1f} s")
    print("ops:", " ".join(ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
