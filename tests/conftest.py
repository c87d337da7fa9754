"""Test configuration: Triton runs in its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the
top of the first module pytest imports. With DPKERNELS_GPU_TESTS=1 it is left unset and the
Triton op tests (tests/ops/test_triton_*.py) run on the GPU instead (see tests/ops/_device.py).
"""

import os

if not os.environ.get("DPKERNELS_GPU_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_default_dtype(torch.float32)
# The test tensors are tiny: with two intra-op threads they mostly wait on each other
# (measured here: a GPT-2-tiny step 1.0 s of CPU with two threads, 0.066 s with one).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _reset_backend():
    """Every test starts with automatic backend choice."""
    import dpkernels

    dpkernels.set_backend(None)
    yield
    dpkernels.set_backend(None)


@pytest.fixture(autouse=True)
def _triton_op_tests_on_the_gpu(request):
    """With DPKERNELS_GPU_TESTS=1 each Triton op test runs with the GPU as torch's default device, so the
    tensors and modules it makes land there (its seeded inputs are made on the CPU and moved, see
    tests/ops/_device.py). Under the CPU interpreter nothing changes. (A fixture here, not in a
    tests/ops/conftest.py: tests/models imports its own conftest by that plain module name.)"""
    module = request.module.__name__.rsplit(".", 1)[-1]
    gpu = os.environ.get("DPKERNELS_GPU_TESTS")
    if not gpu or not module.startswith("test_triton_") or module == "test_triton_compile":
        yield
        return
    with torch.device("cuda"):  # the default device of torch's factory functions inside the test
        yield
