"""torchvision models, converted by make_private with no edit to their code.

ResNet-18 with GroupNorm (Conv2d, GroupNorm, Linear twins), a tiny VisionTransformer (class token
and position table are raw parameters broadcast over the batch; nn.MultiheadAttention twin), and
the refusal of BatchNorm with the fix named. Compared with the naive per-sample clipped sum.
"""

from __future__ import annotations

import io

import pytest
import torch
import torchvision  # noqa: E402  (a test dependency: fail, never skip, when it is missing)
from conftest import DT, TOL, check_model, image_batch, tv_loss, tv_vit
from torch import nn

import dpkernels  # noqa: E402
from dpkernels.nn import DPModule  # noqa: E402


def _resnet18_gn() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3, norm_layer=lambda c: nn.GroupNorm(min(32, c), c)).to(DT)


def test_resnet18_groupnorm():
    """8x8 images: the last stages run at 1x1 (T = 1 convolutions), the first at 4x4."""
    info = check_model(_resnet18_gn(), image_batch(2, size=8), tv_loss, reductions=("sum",))
    m, _ = info["sum"]
    kinds = {type(x).__name__ for x in m.modules()}
    assert {"DPConv2d", "DPGroupNorm", "DPLinear"} <= kinds and not {"Conv2d", "GroupNorm", "Linear"} & kinds


@pytest.mark.slow
@pytest.mark.parametrize("B", [3, 1])
def test_resnet18_groupnorm_larger(B):
    check_model(_resnet18_gn(), image_batch(B, size=16), tv_loss)


def test_resnet18_batchnorm_refused():
    model = torchvision.models.resnet18(num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"'bn1' is a BatchNorm2d.*GroupNorm"):
        dpkernels.make_private(model, opt, noise_multiplier=1.0, expected_batch_size=8.0)


@pytest.mark.parametrize("B", [3, 1])
def test_vit(B):
    model = tv_vit()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    info = check_model(model, image_batch(B), tv_loss)
    m, _ = info["mean"]
    assert isinstance(m, DPModule) and isinstance(m, torchvision.models.VisionTransformer)  # the root is tapped
    assert isinstance(m.encoder, DPModule)
    assert type(m.encoder.layers[0].self_attention).__name__ == "DPMultiheadAttention"
    assert m.state_dict().keys() == sd.keys()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    # The tapped classes are made at run time; the model still pickles (as "re-tap the base class").
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    assert type(m2) is type(m) and type(m2.encoder) is type(m.encoder)
    x = image_batch(B)["pixel_values"]
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)


def test_vit_frozen_raw_parameters():
    """Frozen class token and position table: no tap use is counted, the rest is trained exactly."""
    model = tv_vit()
    model.class_token.requires_grad_(False)
    model.encoder.pos_embedding.requires_grad_(False)
    info = check_model(model, image_batch(3), tv_loss, reductions=("sum",))
    m, opt = info["sum"]
    assert m not in set(opt.reported) and m.encoder not in set(opt.reported)
    assert m.class_token.grad is None


@pytest.mark.parametrize("kw", [dict(strategy="two-pass"), dict(groups="layer-wise")], ids=["two-pass", "layer-wise"])
def test_vit_other_strategies(kw):
    """Two-pass ghost clipping and per-layer groups through the tap and MHA twins."""
    from conftest import clipped_sum, dp_step, per_sample_grads

    model = tv_vit()
    batch = image_batch(3)
    ps = per_sample_grads(tv_vit(), batch, tv_loss)
    if "groups" in kw:
        import copy

        from conftest import per_sample_norms

        # Learn the groups (one per layer), then give each the median of its per-sample norms as bound.
        m0 = copy.deepcopy(model)
        _, _, opt = dp_step(m0, batch, tv_loss, 1.0, "sum", **kw)
        names = {id(p): n for n, p in m0.named_parameters()}
        groups = [[names[id(p)] for p in g] for g in opt.engine.groups]
        bounds = [float(per_sample_norms({n: ps[n] for n in g}).median()) for g in groups]
        _, grads, _ = dp_step(model, batch, tv_loss, bounds, "sum", **kw)
        clipped = unclipped = 0
        for g, R_g in zip(groups, bounds, strict=True):
            want, c = clipped_sum({n: ps[n] for n in g}, R_g, "sum", 3.0)
            clipped, unclipped = clipped + int((c < 1).sum()), unclipped + int((c == 1).sum())
            for n, w in want.items():
                torch.testing.assert_close(grads[n], w, **TOL, msg=lambda s, n=n: f"{n}: {s}")
        assert clipped and unclipped  # both regimes occur
        return
    check_model(model, batch, tv_loss, reductions=("sum",), **kw)
