"""What the engine cannot see from shapes alone is refused by construction, never accepted by coincidence.

- The batch dimension: sequence-first Transformer modules are refused at make_private, and 1-D ids made
  inside the forward (positions shared by every sample) at the forward; every case runs with B == T,
  where the old "first dimension == batch size" check passed and per-position clipping went unseen.
  What is accepted is checked exact against a naive per-sample loop in float64.
- Learning outside the gradient: a buffer written during a training forward (known writers refused at
  make_private, any other detected at the forward, by name).
- Reparametrised layers (spectral_norm, weight_norm, torch.nn.utils.parametrize): refused by name.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.ao import quantization as tq
from torch.nn.utils import parametrizations, spectral_norm, weight_norm

import dpkernels

from .zoo import clip

B = T = 4  # the coincidence the old check could not see
D = 6
# float64 throughout; the engine's norms take other summation orders than the naive loop's flattened
# per-sample gradients (a few ulps times the number of terms, < 1e-13 relative here): 1e-9 keeps a
# wide margin while a per-position clip (factors differing by far more than 1e-6) fails.
TOL = dict(rtol=1e-9, atol=1e-12)


def _private(model: nn.Module, R: float = 1.0):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=float(B), loss_reduction="sum"
    )


def _check_exact(build, inputs: tuple[Tensor, ...], loss) -> None:
    """One noiseless DP step (sum reduction) equals sum_i c_i g_i with g_i from a per-sample loop in float64
    and R the median per-sample norm (about half the samples clipped)."""
    torch.manual_seed(0)
    ref = build().double()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    per = []
    for i in range(inputs[0].shape[0]):
        ref.zero_grad()
        loss(ref(*(t[i : i + 1] for t in inputs))).sum().backward()
        per.append(torch.cat([ref.get_parameter(n).grad.flatten() for n in names]))
    g = torch.stack(per)
    R = float(g.norm(dim=1).median())
    want = torch.einsum("b,bk->k", clip(g.norm(dim=1), R, "abadi"), g)
    torch.manual_seed(0)
    model, opt = _private(build().double(), R)
    loss(model(*inputs)).sum().backward()
    opt.step()
    got = torch.cat([model.get_parameter(n).grad.flatten() for n in names])
    torch.testing.assert_close(got, want, **TOL)


# ------------------------------------------------------------------------------------- batch dimension


def _encoder_layer(batch_first: bool) -> nn.Module:
    return nn.TransformerEncoderLayer(D, 2, dim_feedforward=8, dropout=0.0, batch_first=batch_first)


def _decoder_layer(batch_first: bool) -> nn.Module:
    return nn.TransformerDecoderLayer(D, 2, dim_feedforward=8, dropout=0.0, batch_first=batch_first)


SEQUENCE_FIRST = {
    "TransformerEncoderLayer": lambda: _encoder_layer(False),
    "TransformerDecoderLayer": lambda: _decoder_layer(False),
    "TransformerEncoder": lambda: nn.TransformerEncoder(_encoder_layer(False), 2, enable_nested_tensor=False),
    "TransformerDecoder": lambda: nn.TransformerDecoder(_decoder_layer(False), 2),
    "Transformer": lambda: nn.Transformer(D, 2, 1, 1, dim_feedforward=8, dropout=0.0),
}


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")
@pytest.mark.parametrize("kind", list(SEQUENCE_FIRST))
def test_sequence_first_transformer_modules_are_refused_by_name(kind):
    model = nn.Sequential(nn.Linear(D, D), SEQUENCE_FIRST[kind]())
    with pytest.raises(ValueError, match=rf"module '1' \({kind}\) has batch_first=False.*batch_first=True"):
        _private(model)


def test_a_frozen_sequence_first_layer_is_accepted():
    """Nothing in it is trained: the engine never sees its (T, B, d) rows."""
    layer = _encoder_layer(False).requires_grad_(False)
    _private(nn.ModuleDict({"enc": layer, "head": nn.Linear(D, 2)}))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, D)
        self.enc = _encoder_layer(True)
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)))


def test_batch_first_transformer_layer_is_exact_with_B_equal_T():
    x = torch.randn(B, T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _check_exact(_Encoder, (x,), lambda out: out.square().flatten(1).sum(1))


class _NanoGPT(nn.Module):
    """nanoGPT's embedding: tok_emb (B, T, D) + pos_emb of positions made inside the forward."""

    def __init__(self, positions: str):
        super().__init__()
        self.positions = positions
        self.wte = nn.Embedding(11, D)
        self.wpe = nn.Embedding(T, D)
        self.head = nn.Linear(D, 3)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        if self.positions == "(1, T)":
            pos = pos[None]
        return self.head(torch.tanh(self.wte(idx) + self.wpe(pos)))


def _ids() -> Tensor:
    return torch.randint(0, 11, (B, T), generator=torch.Generator().manual_seed(2))


def test_one_dimensional_positions_made_in_forward_are_refused():
    model, opt = _private(_NanoGPT("(T,)").double())
    with pytest.raises(ValueError, match=r"DPEmbedding 'wpe' got 1-D ids of shape \(4,\).*arange.*pos\[None\]"):
        model(_ids())
    with torch.no_grad():  # outside DP training the model is the torch model
        assert model(_ids()).shape == (B, T, 3)


def test_positions_with_a_batch_dimension_of_one_are_exact_with_B_equal_T():
    _check_exact(lambda: _NanoGPT("(1, T)"), (_ids(),), lambda out: out.square().flatten(1).sum(1))


class _Conditional(nn.Module):
    """A per-sample class id of shape (B,), given to the model, conditions every position."""

    def __init__(self, view: str):
        super().__init__()
        self.view = view
        self.inp = nn.Linear(3, D)
        self.cls = nn.Embedding(5, D)
        self.head = nn.Linear(D, 2)

    def forward(self, x, y):
        y = {"itself": y, "long": y.long(), "flat view": y.view(-1), "column": y[:, None][:, 0]}[self.view]
        return self.head(torch.tanh(self.inp(x) + self.cls(y)[:, None]))


@pytest.mark.parametrize("view", ["itself", "long", "flat view", "column"])
def test_one_dimensional_ids_given_to_the_model_are_per_sample_and_exact(view):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(B, T, 3, dtype=torch.float64, generator=g), torch.randint(0, 5, (B,), generator=g)
    _check_exact(lambda: _Conditional(view), (x, y), lambda out: out.square().flatten(1).sum(1))


def test_one_dimensional_ids_derived_inside_the_forward_are_refused():
    class Derived(_Conditional):
        def forward(self, x, y):
            return self.head(torch.tanh(self.inp(x) + self.cls((y + 1) % 5)[:, None]))

    model, _ = _private(Derived("itself").double())
    with pytest.raises(ValueError, match=r"'cls' got 1-D ids.*ids\[:, None\]"):
        model(torch.randn(B, T, 3, dtype=torch.float64), torch.randint(0, 5, (B,)))


# ------------------------------------------------------------------------------------- state outside the gradient


@pytest.mark.parametrize(
    "observer",
    [lambda: tq.MinMaxObserver(), lambda: tq.MovingAverageMinMaxObserver(), lambda: tq.FakeQuantize()],
    ids=["MinMaxObserver", "MovingAverageMinMaxObserver", "FakeQuantize"],
)
def test_quantization_observers_are_refused_at_make_private(observer):
    obs = observer()
    model = nn.Sequential(nn.Linear(3, D), obs, nn.Linear(D, 2))
    with pytest.raises(ValueError, match=rf"module '1' \({type(obs).__name__}\) records statistics.*disable_observer"):
        _private(model)


def test_fake_quantize_with_its_observer_disabled_trains():
    model = nn.Sequential(nn.Linear(3, D), tq.FakeQuantize(), nn.Linear(D, 2))
    model(torch.randn(8, 3))  # calibrate (public data, before make_private)
    model.apply(tq.disable_observer)
    state = {k: v.clone() for k, v in model[1].state_dict().items()}
    model, opt = _private(model)
    model(torch.randn(B, 3)).square().sum().backward()
    opt.step()
    assert all(torch.equal(v, model[1].state_dict()[k]) for k, v in state.items())


class _Peak(nn.Module):
    """Keeps the largest activation it has seen: a buffer learned from the batch."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("peak", torch.zeros(()))

    def forward(self, x):
        if self.training:
            if self.how == "in place":
                self.peak.copy_(torch.maximum(self.peak, x.detach().max()))
            else:
                self.peak = torch.maximum(self.peak, x.detach().max())
        return x


@pytest.mark.parametrize("how", ["in place", "reassigned"])
def test_a_buffer_written_in_a_training_forward_is_an_error_naming_it(how):
    model, opt = _private(nn.Sequential(nn.Linear(3, D), nn.Sequential(_Peak(how)), nn.Linear(D, 2)))
    with pytest.raises(RuntimeError, match=r"buffer '1\.0\.peak' of module '1\.0' \(_Peak\) was written"):
        model(torch.randn(B, 3))
    model[1].eval()  # the fix the error names: the module no longer writes it
    model(torch.randn(B, 3)).square().sum().backward()
    opt.step()
    model[1].train()  # a train-mode forward under no_grad writes it from the batch all the same: refused too
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"buffer '1\.0\.peak'"):
        model(torch.randn(B, 3))


def test_spectral_norm_power_iteration_on_a_frozen_weight_is_not_learning_from_the_batch():
    """Its u/v buffers are written in every training forward from the weight alone."""
    sn = spectral_norm(nn.Linear(3, D))
    sn.weight_orig.requires_grad_(False)
    psn = parametrizations.spectral_norm(nn.Linear(D, D)).requires_grad_(False)
    model, opt = _private(nn.Sequential(sn, psn, nn.Linear(D, 2)))
    model(torch.randn(B, 3)).square().sum().backward()
    opt.step()


# ------------------------------------------------------------------------------------- reparametrised layers


_P = r"remove_parametrizations"
REPARAMETRISED = {
    "spectral_norm": (
        lambda: spectral_norm(nn.Linear(3, 3)),
        r"spectral_norm on 'weight'; remove it.*freeze \['weight_orig'\]",
    ),
    "weight_norm": (
        lambda: weight_norm(nn.Linear(3, 3)),
        r"weight_norm on 'weight'; remove it.*freeze \['weight_g', 'weight_v'\]",
    ),
    "parametrizations.weight_norm": (lambda: parametrizations.weight_norm(nn.Linear(3, 3)), "_WeightNorm.*" + _P),
    "parametrizations.orthogonal": (lambda: parametrizations.orthogonal(nn.Linear(3, 3)), "weight: _Orthogonal.*" + _P),
    "parametrizations.spectral_norm": (
        lambda: parametrizations.spectral_norm(nn.Linear(3, 3)),
        "weight: _SpectralNorm.*" + _P,
    ),
}


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
@pytest.mark.parametrize("kind", list(REPARAMETRISED))
def test_reparametrised_layers_are_refused_by_name(kind):
    build, what = REPARAMETRISED[kind]
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(build()), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=rf"module '1\.0' \(\w+\) has parameters reparametrised by .*{what}"):
        _private(model)


class _LazyStats(nn.Module):
    """Registers a buffer from the batch inside its forward (the guard's list of buffers predates it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        if "peak" not in self._buffers:
            self.register_buffer("peak", x.detach().abs().amax(0))
        return self.lin(x)


class _NoGradStats(nn.Module):
    """Writes a buffer from the batch under torch.no_grad() in a train-mode forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("peak", torch.zeros(4))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.peak.copy_(x.abs().amax(0))
        return self.lin(x)


def test_a_buffer_registered_in_a_training_forward_is_refused():
    model = _LazyStats()
    model, _ = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=4
    )
    with pytest.raises(RuntimeError, match="registered a buffer during a DP training forward"):
        model(torch.randn(4, 4))


def test_a_buffer_written_under_no_grad_in_train_mode_is_refused():
    """Grad mode off does not make the write public: the batch's maximum would sit in the state dict."""
    model = _NoGradStats()
    model, _ = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=4
    )
    with torch.no_grad(), pytest.raises(RuntimeError, match="buffer 'peak'"):
        model(torch.randn(4, 4))
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 4))  # eval mode: not a training forward


class _Writer(nn.Module):
    """Writes some module state from the batch in a training forward, one way per ``how``."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.lin = nn.Linear(4, 2)
        self.register_buffer("peak", torch.zeros(4))
        self.stats = torch.zeros(4)  # a plain tensor attribute: not registered, not in the state dict

    def forward(self, x):
        m = x.detach().abs().amax(0)
        with torch.no_grad():
            if self.how == "buffer.data.copy_":
                self.peak.data.copy_(m)
            elif self.how == "buffer.data=":
                self.peak.data = m.clone()
            elif self.how == "attribute.copy_":
                self.stats.copy_(m)
            elif self.how == "attribute=":
                self.stats = m
            elif self.how == "attribute.data.copy_":
                self.stats.data.copy_(m)
            elif self.how == "parameter.add_":
                self.lin.bias.add_(m[:2])
            elif self.how == "parameter.data=":
                self.lin.bias.data = self.lin.bias + m[:2]
        return self.lin(x)


WRITES = {  # how -> (the error's subject, how it says it was written)
    "buffer.data.copy_": (r"buffer 'peak'", r"through \.data, which bumps no version counter"),
    "buffer.data=": (r"buffer 'peak'", r"through \.data"),
    "attribute.copy_": (r"attribute 'stats'", r"in place"),
    "attribute=": (r"attribute 'stats'", r"replaced by another tensor"),
    "attribute.data.copy_": (r"attribute 'stats'", r"through \.data, which bumps no version counter"),
    "parameter.add_": (r"parameter 'lin\.bias' of module 'lin' \(DPLinear\)", r"in place"),
    "parameter.data=": (r"parameter 'lin\.bias' of module 'lin' \(DPLinear\)", r"through \.data"),
}


@pytest.mark.parametrize("how", list(WRITES))
def test_module_state_written_in_a_training_forward_is_an_error_naming_it(how):
    """Buffers, plain tensor attributes and parameters, written in place, replaced or through .data (which
    bumps no version counter: compared by value, read at the end of the backward pass). No gradient is
    written; in eval mode the same model trains."""
    subject, said = WRITES[how]
    model, opt = _private(_Writer(how))
    match = rf"{subject} .*was written during a DP training forward (or its backward pass )?\({said}"
    with pytest.raises(RuntimeError, match=match):
        model(torch.randn(B, 4)).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())
    model.how = "nothing"
    model(torch.randn(B, 4)).square().sum().backward()  # the engine is left consistent: the next step works
    opt.step()
    model.how = how
    with torch.no_grad(), pytest.raises(RuntimeError, match=match):  # a train-mode forward with no backward
        model(torch.randn(B, 4))
