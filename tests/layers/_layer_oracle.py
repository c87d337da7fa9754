"""The naive oracle the layer tests share: per-sample gradients by a loop over samples with torch's
autograd on an unconverted float64 copy, and the clipped update computed from them independently of
dpkernels.clipping."""

import torch

DT = torch.float64
EBS = 2.5  # != any realised batch, so dividing by the realised size fails


def per_sample_loss(model, x, y):
    return (model(x) - y).square().flatten(1).sum(1)


def per_sample_grads(ref, x, y):
    """{name: (B, *shape)} gradients of each sample's loss, one sample at a time with torch's autograd."""
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    per: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(x.shape[0]):
        ref.zero_grad(set_to_none=True)
        per_sample_loss(ref, x[i : i + 1], y[i : i + 1]).sum().backward()
        for n, p in params.items():
            per[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    return {n: torch.stack(v) if v else torch.zeros(0, *params[n].shape, dtype=DT) for n, v in per.items()}


def sq_norms(grads, names):
    return sum(grads[n].flatten(1).square().sum(1) for n in names)


def clipped_update(grads, groups, bounds, red):
    """Each group clipped (abadi) at its bound independently of dpkernels.clipping, summed, / EBS for mean."""
    out = {}
    for names, R in zip(groups, bounds, strict=True):
        c = (R / (sq_norms(grads, names).sqrt() + 1e-6)).clamp(max=1.0)
        for n in names:
            out[n] = torch.einsum("b,b...->...", c, grads[n]) / (EBS if red == "mean" else 1.0)
    return out
