"""With DPKERNELS_GPU_TESTS=1 the Triton op tests (test_triton_*.py) run on the GPU: each runs with
the GPU as torch's default device, so the tensors and modules it makes land there (its seeded inputs
are made on the CPU and moved, see _device.py). Under the CPU interpreter nothing changes."""

from __future__ import annotations

import pytest
from _device import DEVICE


@pytest.fixture(autouse=True)
def _triton_tests_on_device(request):
    module = request.module.__name__.rsplit(".", 1)[-1]
    if DEVICE.type == "cpu" or not module.startswith("test_triton_") or module == "test_triton_compile":
        yield
        return
    with DEVICE:  # the default device of torch's factory functions inside the test
        yield
