"""Where the Triton op tests run: the CPU under TRITON_INTERPRET=1 (CI), or the GPU when
DPKERNELS_GPU_TESTS=1 is set (tests/conftest.py then leaves the interpreter off), so that a GPU
session runs the same tests on the hardware. Their tensors are made on the CPU from seeded
generators and moved here, so both runs see the same inputs."""

from __future__ import annotations

import os

import torch

DEVICE = torch.device("cuda" if os.environ.get("DPKERNELS_GPU_TESTS") else "cpu")
