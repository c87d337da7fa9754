"""DPRNN (tanh, relu), DPLSTM (proj_size too) and DPGRU: one noiseless DP step through make_private equal to
the naively clipped sum of per-sample gradients (a loop over batches of one with torch's autograd on an
unconverted float64 copy of the torch layer), for batch_first either way, 1 or 2 layers, one or two
directions, h0/c0 given or not, bk and two-pass, all-layer and layer-wise groups; per-parameter norms
directly; packed sequences of different lengths; dropout between layers; the forward and state_dict of
the torch layer.

Every model takes its input batch first and transposes it for batch_first=False, so the oracle's batches
of one slice the batch dimension; B == T cases make a batch/time mix-up give wrong values, not a shape error.

Tolerance (float64): the DP forward runs the cells with torch ops in another order than torch's kernels
(b_ih + b_hh added apart, GRU's update as n + z (h - n)), a few ulps per step, and the engine's sums run
in other orders than the oracle's; over <= 5 steps and < 1e3 terms that is < 1e-12 relative. rtol=1e-9
keeps a margin while a wrong clip factor (the abadi epsilon alone is 1e-6 relative), scale or norm fails.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _layer_oracle import DT, EBS, clipped_update, per_sample_grads, per_sample_loss, sq_norms
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import dpkernels
import dpkernels.engine
from dpkernels.nn import DPGRU, DPLSTM, DPRNN

TOL = dict(rtol=1e-9, atol=1e-12)
F_IN, H = 3, 4
CELLS = {
    "tanh": lambda **kw: nn.RNN(F_IN, H, **kw),
    "relu": lambda **kw: nn.RNN(F_IN, H, nonlinearity="relu", **kw),
    "lstm": lambda **kw: nn.LSTM(F_IN, H, **kw),
    "gru": lambda **kw: nn.GRU(F_IN, H, **kw),
    "lstm-proj": lambda **kw: nn.LSTM(F_IN, H, proj_size=2, **kw),
}


def _sizes(rnn: nn.RNNBase) -> tuple[int, int]:
    """(number of layer-directions, hidden size of h)."""
    return rnn.num_layers * (2 if rnn.bidirectional else 1), rnn.proj_size or rnn.hidden_size


class Net(nn.Module):
    """x (B, T, F) batch first -> rnn -> [Linear head on the output, h_n, c_n] flattened per sample.

    With ``h0`` the initial states come from a Linear on the first input step (gradient flows into
    them through the recurrence); with ``twice`` the rnn runs a second time on the reversed sequence.
    With ``packed`` the last input feature marks the real steps (1) of each sample: the rnn gets a
    PackedSequence of the other features (garbage at padded steps), and the per-sample oracle's
    batches of one carry their own lengths.
    """

    def __init__(self, rnn: nn.RNNBase, h0: bool = False, twice: bool = False, packed: bool = False):
        super().__init__()
        self.rnn, self.twice, self.packed = rnn, twice, packed
        n, hs = _sizes(rnn)
        self.head = nn.Linear(hs * (2 if rnn.bidirectional else 1), 2)
        self.init = nn.Linear(F_IN, n * (hs + rnn.hidden_size)) if h0 else None

    def _hx(self, x):
        if self.init is None:
            return None
        n, hs = _sizes(self.rnn)
        s = torch.tanh(self.init(x[:, 0, :F_IN]))  # the first step: real in every sample
        h = s[:, : n * hs].reshape(-1, n, hs).transpose(0, 1).contiguous()  # (n, B, hs): batch in dim 1
        c = s[:, n * hs :].reshape(-1, n, self.rnn.hidden_size).transpose(0, 1).contiguous()
        return (h, c) if isinstance(self.rnn, nn.LSTM) else h

    def _run(self, x):
        rnn, hx = self.rnn, self._hx(x)
        T = x.shape[1]
        if self.packed:
            lengths = x[..., -1].sum(1).long()
            seq = pack_padded_sequence(x[..., :F_IN], lengths, batch_first=True, enforce_sorted=False)
            out, h = rnn(seq, hx)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        else:
            out, h = rnn(x if rnn.batch_first else x.transpose(0, 1), hx)
            out = out if rnn.batch_first else out.transpose(0, 1)
        hs = h if isinstance(h, tuple) else (h,)
        return torch.cat([self.head(out).flatten(1), *(t.transpose(0, 1).flatten(1) for t in hs)], 1)

    def forward(self, x):
        y = self._run(x)
        return y + 0.5 * self._run(x.flip(1)) if self.twice else y


def _model(cell: str, seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    net_kw = {k: kw.pop(k) for k in ("h0", "twice", "packed") if k in kw}
    return Net(CELLS[cell](**kw), **net_kw).to(DT)


def _input(B: int, T: int, seed: int, lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(B, T, F_IN, generator=gen, dtype=DT)
    if lengths is not None:
        mark = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(DT)
        x = torch.cat([x, mark[..., None]], -1)
    return x, x


def _dp(model, R, red="mean", **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=EBS, loss_reduction=red, **kw
    )


def check_step(model: nn.Module, x: torch.Tensor, red: str = "mean", **kw):
    """One noiseless DP step of ``model`` on x against the oracle; R the median per-sample norm."""
    ref = copy.deepcopy(model)
    y = torch.randn(ref(x).shape, generator=torch.Generator().manual_seed(7), dtype=DT)
    grads = per_sample_grads(ref, x, y)
    norms = sq_norms(grads, list(grads)).sqrt()
    R = norms.median().item() if norms.numel() and norms.max() > 0 else 1.0  # some samples clipped, some not
    xr, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    lr = per_sample_loss(ref, xr, y)
    (lr.mean() if red == "mean" else lr.sum()).backward()
    model, opt = _dp(model, R, red, **kw)
    assert type(model.rnn) is dpkernels.DP_LAYERS[type(ref.rnn)]
    loss = per_sample_loss(model, xd, y)
    opt.backward(loss.mean() if red == "mean" else loss.sum())
    opt.step()  # lr = 0: only finishes parameters no sample reached
    name = {id(p): n for n, p in model.named_parameters()}
    groups = [[name[id(p)] for p in ps] for ps in opt.engine.groups]
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = clipped_update(grads, groups, opt.engine.bounds, red)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")
    if kw.get("strategy") != "two-pass":  # two backward passes accumulate x.grad twice (the engine's design)
        torch.testing.assert_close(xd.grad, xr.grad, **TOL)  # grad_input as torch's
    return opt, grads, norms, R


MODES = [
    dict(strategy="bk", groups="all-layer"),
    dict(strategy="two-pass", groups="layer-wise"),
    dict(strategy="bk", groups="layer-wise"),
    dict(strategy="two-pass", groups="all-layer"),
]


def _check_config(cell, batch_first, num_layers, bidirectional, mode):
    h0 = bidirectional != batch_first  # each cell with and without given initial states
    model = _model(cell, 0, batch_first=batch_first, num_layers=num_layers, bidirectional=bidirectional, h0=h0)
    x, _ = _input(3, 4, 1)
    opt, _, norms, R = check_step(model, x, red="mean" if num_layers == 1 else "sum", **mode)
    assert bool((norms > R).any()) and bool((norms < R).any())


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tf"])
@pytest.mark.parametrize("cell", ["tanh", "relu", "lstm", "gru"])
def test_step_matches_per_sample_oracle(cell, batch_first, num_layers, bidirectional):
    """Every cell x layout x depth x directions; the four strategy/group modes cycle over (batch_first,
    num_layers), so each cell meets each mode with one and with two directions (the full cross: slow)."""
    mode = MODES[2 * (not batch_first) + num_layers - 1]
    _check_config(cell, batch_first, num_layers, bidirectional, mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m['strategy']}-{m['groups']}")
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tf"])
@pytest.mark.parametrize("cell", ["tanh", "relu", "lstm", "gru"])
def test_step_every_mode(cell, batch_first, num_layers, bidirectional, mode):
    _check_config(cell, batch_first, num_layers, bidirectional, mode)


@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tf"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_batch_equal_to_time(cell, batch_first):
    """B == T: a batch/time confusion anywhere keeps every shape and changes the values."""
    model = _model(cell, 2, batch_first=batch_first, num_layers=2, bidirectional=True, h0=True)
    check_step(model, _input(4, 4, 3)[0])


@pytest.mark.parametrize("cell", list(CELLS))
def test_per_parameter_norms(cell):
    """Param-wise groups: the engine's per-sample norm of each parameter, read at the clip, equals the oracle's."""
    model = _model(cell, 4, batch_first=False, num_layers=2, bidirectional=True, h0=True)
    x, _ = _input(3, 5, 5)
    seen: dict[int, torch.Tensor] = {}
    real = dpkernels.engine.Engine._group_norms

    def spy(self, gi):
        n2 = real(self, gi)
        seen[gi] = n2 / self.loss_scale() ** 2  # the squared norms the clip factors come from
        return n2

    dpkernels.engine.Engine._group_norms = spy  # type: ignore[method-assign]
    try:
        opt, grads, _, _ = check_step(model, x, red="sum", groups="param-wise")
    finally:
        dpkernels.engine.Engine._group_norms = real  # type: ignore[method-assign]
    name = {id(p): n for n, p in model.named_parameters()}
    assert len(seen) == len(opt.engine.groups) == len(name)
    for gi, ps in enumerate(opt.engine.groups):
        (n,) = [name[id(p)] for p in ps]
        torch.testing.assert_close(seen[gi], sq_norms(grads, [n]), **TOL, msg=lambda m, n=n: f"{n}: {m}")
    assert "rnn" in opt.engine.report()


@pytest.mark.parametrize("cell", list(CELLS))
def test_used_twice_and_proj(cell):
    """The layer called twice in one forward: its calls' stacks concatenated along time (the summed gradient)."""
    model = _model(cell, 6, batch_first=True, num_layers=2, bidirectional=True, twice=True)
    check_step(model, _input(3, 4, 7)[0], strategy="two-pass")


@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "tf"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_sequences(cell, batch_first):
    """Samples of lengths 4, 1, 3, 2 (unsorted) in one PackedSequence: each padded step contributes nothing;
    h_n is each sample's state at its own last step, for both directions."""
    model = _model(cell, 8, batch_first=batch_first, num_layers=2, bidirectional=True, packed=True, h0=True)
    x, _ = _input(4, 4, 9, lengths=[4, 1, 3, 2])
    x[:, :, :F_IN][x[..., -1] == 0] = 1e3  # garbage at padded steps: it must not reach any gradient
    check_step(model, x)


def test_packed_sorted_output_matches_torch():
    """enforce_sorted=True (no index permutation) and the packed output/h_n/c_n against torch's."""
    for cell in CELLS:
        rnn = CELLS[cell](num_layers=2, bidirectional=True).to(DT)
        torch.manual_seed(0)
        ref = copy.deepcopy(rnn)
        model, _ = _dp(nn.Sequential(rnn), 1.0)
        for enforce in (True, False):
            lengths = [5, 3, 3, 1] if enforce else [3, 5, 1, 3]
            x = torch.randn(4, 5, F_IN, dtype=DT)
            seq = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=enforce)
            got, want = model[0](seq), ref(seq)
            assert torch.equal(got[0].batch_sizes, want[0].batch_sizes)
            torch.testing.assert_close(got[0].data, want[0].data, **TOL)
            torch.testing.assert_close(got[1], want[1], **TOL)


@pytest.mark.parametrize("cell", list(CELLS))
def test_frozen_parameters(cell):
    """Some parameters frozen (a whole layer-direction among them): the others exact, the frozen ones untouched."""
    model = _model(cell, 10, batch_first=True, num_layers=2, bidirectional=True)
    for n, p in model.rnn.named_parameters():
        if n.endswith("_l0") or n.startswith("bias_ih") or n == "weight_hh_l1_reverse":
            p.requires_grad_(False)
    check_step(model, _input(3, 4, 11)[0], groups="layer-wise")


def test_empty_batch():
    """A Poisson batch of 0 samples: every parameter gets the noise only (here zero)."""
    for cell in CELLS:
        model = _model(cell, 12, batch_first=False, num_layers=2, bidirectional=True)
        opt, _, _, _ = check_step(model, _input(0, 3, 13)[0])
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_dropout_between_layers():
    """Dropout in training: the DP forward draws torch's mask for the same seed (CPU), so the oracle is each
    sample's gradient in torch's batched forward with that mask (samples do not interact), by autograd."""
    for cell in CELLS:
        for batch_first in (True, False):
            model = _model(cell, 14, batch_first=batch_first, num_layers=3, bidirectional=True, dropout=0.4)
            ref = copy.deepcopy(model)
            x, _ = _input(3, 4, 15)
            torch.manual_seed(1)
            out = ref(x)
            y = torch.randn(out.shape, dtype=DT)
            losses = (out - y).square().sum(1)
            params = [p for p in ref.parameters()]
            grads = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(3)]
            per = {n: torch.stack([g[k] for g in grads]) for k, (n, _) in enumerate(ref.named_parameters())}
            norms = sq_norms(per, list(per)).sqrt()
            R = norms.median().item()
            model, opt = _dp(model, R, "sum")
            torch.manual_seed(1)
            got_out = model(x)
            torch.testing.assert_close(got_out, out, **TOL)  # the same mask
            (got_out - y).square().sum(1).sum().backward()
            opt.step()
            want = clipped_update(per, [list(per)], opt.engine.bounds, "sum")
            for n, p in model.named_parameters():
                torch.testing.assert_close(p.grad, want[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


def test_forward_state_dict_and_from_module_match_torch():
    for cell in CELLS:
        for kw in (dict(batch_first=True), dict(num_layers=2, bidirectional=True, bias=False)):
            layer = CELLS[cell](**kw)
            dp = dpkernels.DP_LAYERS[type(layer)].from_module(layer)
            assert type(dp) in (DPRNN, DPLSTM, DPGRU)
            assert all(p is q for p, q in zip(dp.parameters(), layer.parameters(), strict=True))
            assert list(dp.state_dict()) == list(layer.state_dict())
            assert repr(dp).split("(", 1)[1] == repr(layer).split("(", 1)[1]
            x = torch.randn(3, 5, F_IN)
            for a, b in zip(dp(x), layer(x), strict=True):  # no engine: torch's forward itself
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            # a state_dict round trip through a fresh torch layer
            fresh = CELLS[cell](**kw)
            fresh.load_state_dict(dp.state_dict())
            dp2 = dpkernels.DP_LAYERS[type(layer)].from_module(CELLS[cell](**kw))
            dp2.load_state_dict(fresh.state_dict())
            for a, b in zip(dp2.state_dict().values(), layer.state_dict().values(), strict=True):
                assert torch.equal(a, b)
    with pytest.raises(TypeError, match="takes a LSTM"):
        DPLSTM.from_module(nn.GRU(3, 4))


@pytest.mark.parametrize("cell", list(CELLS))
def test_dp_forward_matches_torch_and_eval_is_torch(cell):
    """With DP training on, the forward (output, h_n, c_n) is torch's up to rounding for every layout; under
    no_grad (evaluation) the private model runs torch's own forward, bit for bit."""
    for batch_first in (True, False):
        rnn = CELLS[cell](num_layers=2, bidirectional=True, batch_first=batch_first).to(DT)
        ref = copy.deepcopy(rnn)
        model, _ = _dp(nn.Sequential(rnn), 1.0)
        x = torch.randn(5, 3, F_IN, dtype=DT)  # (B, T) or (T, B): both read the right dimension as the batch
        n, hs = _sizes(ref)
        h0 = torch.randn(n, 5 if batch_first else 3, hs, dtype=DT)
        c0 = torch.randn(n, 5 if batch_first else 3, H, dtype=DT)
        hx = (h0, c0) if isinstance(ref, nn.LSTM) else h0
        for args in ((x,), (x, hx)):
            got, want = model[0](*args), ref(*args)
            torch.testing.assert_close(got[0], want[0], **TOL)
            torch.testing.assert_close(got[1], want[1], **TOL)
            with torch.no_grad():
                got = model[0](*args)
            torch.testing.assert_close(got, ref(*args), rtol=0, atol=0)


def test_unbatched_input_is_refused_in_training():
    model, _ = _dp(nn.Sequential(nn.LSTM(F_IN, H)), 1.0)
    with pytest.raises(ValueError, match=r"DPLSTM '0' got an input of shape \(5, 3\).*batch"):
        model(torch.randn(5, F_IN))
    with torch.no_grad():
        model(torch.randn(5, F_IN))  # evaluation: torch's forward, unbatched allowed


@pytest.mark.parametrize("cell", ["lstm-proj", "gru"])
def test_accumulation_and_noise(cell):
    """Two micro-batches (accumulation_steps=2) give the whole batch's clipped sum; with noise on, each
    parameter's gradient is that sum plus sigma R times its own seed's N(0, I) stream, once, over EBS."""
    model = _model(cell, 16, batch_first=False, num_layers=2, bidirectional=True, h0=True)
    ref = copy.deepcopy(model)
    x, _ = _input(4, 3, 17)
    y = torch.randn(ref(x).shape, generator=torch.Generator().manual_seed(7), dtype=DT)
    grads = per_sample_grads(ref, x, y)
    R = sq_norms(grads, list(grads)).sqrt().median().item()
    want = clipped_update(grads, [list(grads)], [R], "sum")
    sigma = 0.7
    model, opt = dpkernels.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=R,
        expected_batch_size=EBS,
        loss_reduction="sum",
        accumulation_steps=2,
        seed=3,
    )
    for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
        per_sample_loss(model, xs, ys).sum().backward()
    eng = opt.engine
    for n, p in model.named_parameters():
        noise = dpkernels.ops.add_noise(
            None, p.shape, noise_std=sigma * R, scale=1.0, seed=eng.param_seed(p), device=p.device, dtype=DT
        )  # that parameter's own stream
        assert noise.abs().max() > 0.1 * sigma * R
        torch.testing.assert_close(p.grad, want[n] + noise, **TOL, msg=lambda m, n=n: f"{n}: {m}")
    opt.step()


@pytest.mark.slow
@pytest.mark.parametrize("cell,batch_first", [("lstm-proj", False), ("gru", True)])
def test_triton_backend(cell, batch_first):
    """The (B, T, .) stacks, time-major views for batch_first=False among them, through the Triton kernels
    (the CPU interpreter here)."""
    if "triton" not in dpkernels.available_backends():
        pytest.skip("triton backend not available")
    dpkernels.set_backend("triton")
    model = _model(cell, 18, batch_first=batch_first, num_layers=2, bidirectional=True, h0=True)
    check_step(model, _input(3, 4, 19)[0])
    assert dpkernels.ops.last_backend["linear_norms"] == "triton"
    assert dpkernels.ops.last_backend["linear_clipped_sum"] == "triton"


@pytest.mark.parametrize("cell", ["lstm-proj", "gru"])
def test_autocast_runs_in_its_dtype(cell):
    """Under autocast the DP forward runs every tensor in the autocast dtype (as torch's RNN kernels do on
    CUDA; torch's own CPU LSTM refuses bf16), and its gradients follow the fp32 ones."""
    grads = []
    for amp in (False, True):
        torch.manual_seed(20)
        model = Net(CELLS[cell](num_layers=2, bidirectional=True, batch_first=True))
        # R huge: every clip factor is 1 and the DP gradient is the plain gradient
        model, opt = dpkernels.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=1e9,
            expected_batch_size=1.0,
            loss_reduction="sum",
        )
        x = torch.randn(3, 4, F_IN, generator=torch.Generator().manual_seed(21))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out, _ = model.rnn(x)
            assert out.dtype == (torch.bfloat16 if amp else torch.float32)
            out.float().square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, want in grads[0].items():
        # bf16 keeps 8 bits: each product and state is off by <= 2^-8 relative, a few steps compound it;
        # 5e-2 of the largest entry passes that and fails a wrong formula (O(1) off)
        scale = want.abs().max().item()
        torch.testing.assert_close(grads[1][n], want, rtol=5e-2, atol=5e-2 * scale, msg=lambda m, n=n: f"{n}: {m}")
