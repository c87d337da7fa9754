"""Test configuration: Triton runs in its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the
top of the first module pytest imports.
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
