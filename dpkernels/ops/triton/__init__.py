"""Triton backend: per-sample gradient norms and clipped, noised sums as fused kernels, for Linear
layers and biases (linear_norms.py, linear_clipped_sum.py), Conv1d/2d/3d by implicit GEMM (conv.py),
Embedding with the tied-head cross term (embedding.py) and the affine parameters of LayerNorm, RMSNorm
and GroupNorm (affine.py); add_noise.py holds the noise epilogue they share and `add_noise`,
secure_noise.py the secure-mode noise (ChaCha20 in the kernel), _common.py what every op shares
(registration, launch configurations, the launch point). The dispatcher (dpkernels.ops) checks every
op's inputs before calling a backend (ops._validate); called directly, these functions assume checked inputs.

Each op has the reference's name and signature (dpkernels.ops.reference) and wraps one
`torch.library.custom_op` in the ``dpkernels`` namespace (``dpkernels::triton_<op>``;
the prefix keeps the csrc backend free to register its own ops in the namespace), with a
`register_fake` impl, so `torch.compile(fullgraph=True)` traces through the ops and
`torch.library.opcheck` passes. `custom_op` is used rather than `triton_op` + `wrap_triton`:
on torch 2.14 / triton 3.8 the latter runs eagerly but fails torch.compile and opcheck under
the CPU interpreter (TRITON_INTERPRET=1) that the tests use, while `custom_op` passes all
three. The cost is that Inductor cannot see into the kernels (no fusion across them), which
the fused kernels make moot.

Kernels run on CUDA tensors, or on the CPU when TRITON_INTERPRET=1 was set before triton
was imported (the tests do this). Importing this module only defines the ops.

Results differ from the reference in one documented way: the noise z is drawn by Philox
inside the kernels (keyed by the seed and the element's offset), not by torch.Generator;
see add_noise.py.
"""

from __future__ import annotations

from .add_noise import add_noise
from .affine import affine_clipped_sum, affine_norms, affine_norms_bound
from .conv import conv_clipped_sum, conv_norms, conv_norms_bound
from .embedding import embedding_clipped_sum, embedding_linear_cross, embedding_norms, embedding_norms_bound
from .linear_clipped_sum import bias_clipped_sum, linear_clipped_sum
from .linear_norms import bias_norms, bias_norms_bound, linear_norms, linear_norms_bound
from .secure_noise import chacha20_blocks, secure_noise

__all__ = [
    "add_noise",
    "affine_clipped_sum",
    "affine_norms",
    "affine_norms_bound",
    "bias_clipped_sum",
    "bias_norms",
    "bias_norms_bound",
    "conv_clipped_sum",
    "conv_norms",
    "conv_norms_bound",
    "embedding_clipped_sum",
    "embedding_linear_cross",
    "embedding_norms",
    "embedding_norms_bound",
    "linear_clipped_sum",
    "linear_norms",
    "linear_norms_bound",
    "chacha20_blocks",
    "secure_noise",
]
