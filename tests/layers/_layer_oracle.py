"""The layer tests' use of the suite's naive oracle (tests/oracle.py): per-sample gradients by a loop over
samples with torch's autograd on an unconverted float64 copy, and the clipped update built from them
independently of dpkernels.clipping."""

import oracle
import torch

DT = torch.float64
EBS = 2.5  # != any realised batch, so dividing by the realised size fails


def per_sample_loss(model, x, y):
    return (model(x) - y).square().flatten(1).sum(1)


def per_sample_grads(ref, x, y):
    """{name: (B, *shape)} gradients of each sample's squared-error loss."""
    return oracle.per_sample_grads(ref, lambda m, s: per_sample_loss(m, *s), (x, y))


sq_norms = oracle.sq_norms


def clipped_update(grads, groups, bounds, red):
    """Each group clipped (abadi) at its bound, summed, / EBS for mean."""
    return oracle.clipped_update(grads, groups, bounds, EBS if red == "mean" else 1.0)
