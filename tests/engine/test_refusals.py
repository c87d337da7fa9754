"""What cannot be made private is refused, with an error that names the module or parameter and says
what to do; never trained silently without privacy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpkernels

from .zoo import BY_NAME, batch, batch_loss


def _private(model: nn.Module, **kw):
    kw = dict(dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0), **kw)
    return dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def _mlp() -> nn.Module:
    return BY_NAME["mlp"].build()


# ------------------------------------------------------------------------------------- model structure


@pytest.mark.parametrize("bn", [nn.BatchNorm1d(9), nn.SyncBatchNorm(9)], ids=["BatchNorm1d", "SyncBatchNorm"])
def test_batchnorm_is_refused_with_groupnorm_suggested(bn):
    model = nn.Sequential(nn.Linear(5, 9), bn, nn.Linear(9, 2))
    with pytest.raises(ValueError, match=r"'1'.*GroupNorm"):
        _private(model)


def test_batchnorm2d_in_a_submodule_is_named():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Sequential(nn.Tanh(), nn.BatchNorm2d(4, affine=False)))
    # no trainable parameter in it, but batch statistics still mix samples
    with pytest.raises(ValueError, match=r"'1\.1'.*BatchNorm2d.*GroupNorm"):
        _private(model)


def test_instancenorm_running_statistics_are_refused():
    """Per-sample normalisation is fine; running statistics are noiseless averages of the batches, released
    with the model."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True), nn.Flatten())
    with pytest.raises(ValueError, match=r"'1' is a InstanceNorm2d with track_running_stats=True"):
        _private(model)
    _private(nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4), nn.Flatten()))  # no running stats: fine


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x) * self.scale


def test_trainable_parameter_no_dp_layer_covers_is_refused():
    with pytest.raises(ValueError, match=r"'scale'.*_Scaled.*requires_grad_\(False\)"):
        _private(_Scaled())


def test_frozen_uncovered_parameter_is_accepted():
    model = _Scaled()
    model.scale.requires_grad_(False)
    model, opt = _private(model)  # nothing to refuse: the frozen parameter is never updated
    x = torch.randn(3, 5)
    model(x).sum().backward()
    opt.step()
    assert model.scale.grad is None


def test_optimizer_parameter_outside_the_model_is_refused():
    model = _mlp()
    temp = nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([*model.parameters(), temp], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[\d+\] \(not in the model\) .*not be private"):
        dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0)


def test_parameter_added_to_the_optimizer_later_blocks_the_step():
    """A parameter group added after make_private gets a plain autograd gradient: no step, nothing changed."""
    model, opt = _private(_mlp())
    case = BY_NAME["mlp"]
    x, y = batch(case, 4)
    extra = nn.Linear(y.shape[-1], y.shape[-1]).to(y.dtype)
    opt.add_param_group({"params": list(extra.parameters())})
    opt.zero_grad()
    batch_loss(case, extra(model(x)), y, "mean").backward()
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    with pytest.raises(RuntimeError, match=r"no step was taken: param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    after = [p.detach() for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_changing_what_is_frozen_after_make_private_blocks_the_step():
    """Frozen after make_private: the engine still noises it and SGD would move it. Unfrozen after: the
    engine was not given it. Either way no step; make_private again on the same model takes the new set."""
    case = BY_NAME["mlp"]
    x, y = batch(case, 4)
    model, opt = _private(_mlp())
    model[0].requires_grad_(False)  # the whole layer: it reports nothing, and the step refuses
    opt.zero_grad()
    batch_loss(case, model(x), y, "mean").backward()
    with pytest.raises(RuntimeError, match="was frozen after make_private, but the engine still"):
        opt.step()
    for first, then in [(True, False), (False, True)]:
        model = _mlp()
        model[0].weight.requires_grad_(first)
        model, opt = _private(model)
        model[0].weight.requires_grad_(then)
        w = model[0].weight.detach().clone()
        opt.zero_grad()
        if first:  # the engine sees it at the layer's backward
            with pytest.raises(RuntimeError, match=r"DP layer '0' was frozen after make_private"):
                batch_loss(case, model(x), y, "mean").backward()
        else:  # the engine sees a parameter of its layer it was not given
            with pytest.raises(RuntimeError, match=r"parameter 'weight' of DP layer '0' is not one the engine was"):
                batch_loss(case, model(x), y, "mean").backward()
        assert torch.equal(model[0].weight, w)
        with pytest.raises(ValueError, match="already a DPOptimizer.*original_optimizer"):
            dpkernels.make_private(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0)
        model, opt = _private(model)  # again, with the parameters as they are now
        opt.zero_grad()
        batch_loss(case, model(x), y, "mean").backward()
        opt.step()
        assert then == (not torch.equal(model[0].weight, w))  # trained exactly when trainable


@pytest.fixture
def _one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_data_parallel_is_refused(_one_process_group):
    """DDP's all-reduce and the engine's own .grad writes cannot be combined (one process: every gradient
    came out zero): refused when make_private gets a wrapped model, and at the forward of a private model
    wrapped afterwards."""
    wrapped = nn.parallel.DistributedDataParallel(_mlp())
    with pytest.raises(ValueError, match=r"'<model>' is a DistributedDataParallel.*unwrapped model"):
        _private(wrapped)
    model, _ = _private(_mlp())
    x, _ = batch(BY_NAME["mlp"], 4)
    with pytest.raises(RuntimeError, match="inside a DistributedDataParallel"):
        nn.parallel.DistributedDataParallel(model)(x)
    assert model(x).shape[0] == 4  # the model itself still runs


class _MyLinear(nn.Linear):
    """A subclass may change forward: only exact torch types are converted."""


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        out = self.inner(x)
        return self.head(out[0] if isinstance(out, tuple) else out)


@pytest.mark.parametrize(
    "inner,match",
    [
        (nn.PReLU(3), r"'inner\.weight'.*PReLU"),
        (nn.GRUCell(3, 3), r"'inner\.weight_ih'.*GRUCell"),
        (_MyLinear(3, 3), r"'inner\.weight'.*_MyLinear"),
    ],
    ids=["PReLU", "GRUCell", "Linear-subclass"],
)
def test_unsupported_layer_is_refused_by_parameter_name(inner, match):
    with pytest.raises(ValueError, match=match):
        _private(_Wrap(inner))


def test_model_without_trainable_dp_layer_is_refused():
    model = nn.Sequential(nn.Linear(5, 3))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        _private(model)


# ------------------------------------------------------------------------------------- use at run time


def test_two_pass_with_plain_loss_backward_is_refused():
    case = BY_NAME["mlp"]
    model, opt = _private(case.build(), strategy="two-pass")
    x, y = batch(case, 3)
    with pytest.raises(RuntimeError, match=r"optimizer\.backward\(loss\)"):
        batch_loss(case, model(x), y, "mean").backward()


class _Broadcast(nn.Module):
    """Adds a projection of a (1, T, d) table to a (B, T, d) batch: the projection sees one row."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.pos = nn.Linear(4, 6)
        self.register_buffer("table", torch.randn(1, 3, 4))

    def forward(self, x):
        return self.inp(x) + self.pos(self.table)


@pytest.mark.parametrize("strategy", ["bk", "two-pass"])
def test_batch_broadcast_into_a_linear_is_refused(strategy):
    model, opt = _private(_Broadcast(), strategy=strategy)
    x = torch.randn(5, 3, 4)
    with pytest.raises(RuntimeError, match=r"'pos'.*batch of 1 samples.*batch has 5.*expand"):
        opt.backward(model(x).square().sum())


def test_the_same_model_with_the_input_expanded_is_accepted():
    class Expanded(_Broadcast):
        def forward(self, x):
            return self.inp(x) + self.pos(self.table.expand(x.shape[0], -1, -1))

    model, opt = _private(Expanded())
    model(torch.randn(5, 3, 4)).square().sum().backward()
    opt.step()
    assert model.pos.weight.grad is not None


# ------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(noise_multiplier=None, target_epsilon=1.0, sample_rate=0.01, steps=10), "target_delta"),
        (dict(noise_multiplier=None, target_epsilon=1.0, target_delta=1e-5, steps=10), "sample_rate"),
        (dict(noise_multiplier=None, target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01), r"steps=\.\.\..*epochs"),
        (dict(target_epsilon=1.0, noise_multiplier=1.0, target_delta=1e-5, sample_rate=0.01, steps=5), "exactly one"),
        (dict(noise_multiplier=None), "exactly one"),
        (dict(clipping="flat"), r"clipping.*'abadi'.*'automatic'.*'flat'"),
        (dict(strategy="ghost"), r"strategy.*'bk'.*'two-pass'.*'ghost'"),
        (dict(loss_reduction="avg"), r"loss_reduction.*'avg'"),
        (dict(accountant="gdp", sample_rate=0.01), r"accountant.*'gdp'"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be positive"),
        (dict(max_grad_norm=[1.0, 1.0], groups="all-layer"), "2 bounds for 1 clipping groups"),
        (dict(max_grad_norm=[1.0, -1.0, 1.0], groups="layer-wise"), "positive"),
        (dict(expected_batch_size=None), "expected_batch_size"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier must be a finite number"),
        (dict(clipping="automatic", gamma=-0.5), "gamma must be a finite number > 0"),
        (dict(clipping="automatic", gamma=0.0), "gamma must be a finite number > 0"),
        (dict(max_grad_norm=float("inf")), "max_grad_norm must be positive and finite"),
        (dict(max_grad_norm=[1.0, float("nan"), 1.0], groups="layer-wise"), "positive and finite"),
        (dict(expected_batch_size=float("inf")), "expected_batch_size must be a finite"),
        (dict(accumulation_steps=0), "accumulation_steps"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    base = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0)
    base.update(kw)
    base = {k: v for k, v in base.items() if v is not None}
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        dpkernels.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), **base)


@pytest.mark.parametrize(
    "groups,err,match",
    [
        ("per-layer", ValueError, r"'all-layer', 'layer-wise', 'param-wise'.*'per-layer'"),
        ([["0", "2"], ["5"]], ValueError, r"groups\[1\] names '5'.*known layers: \['0', '2', '4'\]"),
        ([["0", "2"], ["2", "4"]], ValueError, r"'2' is listed in two clipping groups"),
        ([["0", "2"]], ValueError, r"in no clipping group: \['4'\]"),
        ([["0", "2"], "4"], TypeError, r"groups\[1\] is the string '4'"),
        ([["0", "2", "4"], []], ValueError, r"group\(s\) \[1\].*no trainable parameter"),
    ],
)
def test_bad_group_specs_are_refused(groups, err, match):
    with pytest.raises(err, match=match):
        _private(_mlp(), groups=groups)


def test_unbatched_input_to_a_linear_is_refused():
    model, opt = _private(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"DPLinear '0' got an input of shape \(4,\).*\(B, \.\.\., 4\)"):
        model(torch.randn(4))
    x = torch.randn(3, 4)  # the engine is not left half-way: a batched step still works
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    assert all(p.grad is not None for p in model.parameters())


class _RawHead(nn.Module):
    """A language-model head written as a raw matmul with the embedding table: a use outside any DP layer."""

    def __init__(self, raw: bool):
        super().__init__()
        self.emb, self.mix, self.raw = nn.Embedding(10, 4), nn.Linear(4, 4), raw

    def forward(self, x):
        h = torch.tanh(self.mix(self.emb(x)))
        return h @ self.emb.weight.t() if self.raw else h


def test_parameter_used_outside_its_dp_layers_is_an_error():
    """Its gradient from that use would have no per-sample norm (and was silently dropped): an error naming
    it, with .grad untouched and the engine ready for the next step."""
    torch.manual_seed(0)
    model, opt = _private(_RawHead(raw=True))
    x = torch.randint(0, 10, (3, 5))
    sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    with pytest.raises(RuntimeError, match=r"'emb\.weight' is used outside its DP layers"):
        model(x).sum().backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, sentinel[n]), n
    model.raw = False
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert all(p.grad is not None for p in model.parameters())


def test_batch_flattened_into_rows_is_refused():
    """(B, T, d) viewed as (B*T, d) before a Linear makes every row a 'sample': refused, saying to keep B."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h.reshape(-1, h.shape[-1]))

    model, _ = _private(Flat())
    with pytest.raises(RuntimeError, match=r"DP layer 'b' saw a batch of 12 samples.*has 3.*x\.view\(-1, d\)"):
        model(torch.randn(3, 4, 5)).sum().backward()
