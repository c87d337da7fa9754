"""Data-parallel DP training (make_private(distributed=True)) on 2 gloo processes against one process.

One torchrun launch runs every scenario (tests/distributed/_worker.py); the tests read its numbers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dpkernels
from dpkernels.distributed import DistributedPoissonSampler

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *extra: str) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "tests.distributed._worker", "--out", str(out), *extra,
    ]  # fmt: skip
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])  # tests/oracle.py
    env = {**os.environ, "PYTHONPATH": path}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("ddp") / "results.json")


EXACT = [
    "exact/mlp/bk",
    "exact/conv2d/bk",
    "exact/embedding/bk",
    "exact/layernorm/bk",
    "exact/tied/bk",
    "exact/mlp/two-pass",
    "exact/tied/two-pass",
    "exact/mlp/layer-wise",
    "exact/tied/layer-wise",
    "exact/mlp/empty-rank",
    "exact/mlp/accumulation",
]


@pytest.mark.parametrize("key", EXACT)
def test_two_ranks_equal_one_process_on_the_union(two_ranks, key):
    """float64, noise off: the all-reduced clipped sums equal the single-process step on the union of the ranks'
    batches. 1e-12: the two differ only in the order of float64 additions of a few hundred terms (error ~1e-14)."""
    r = two_ranks[key]
    assert r["norm"] > 0.01  # a step that moved something
    assert r["ranks_equal"], "ranks hold different gradients after the all-reduce"
    assert r["rel_err"] < 1e-12


FSDP = [
    "fsdp/mlp/bk",
    "fsdp/conv2d/bk",
    "fsdp/embedding/bk",
    "fsdp/layernorm/bk",
    "fsdp/tied/bk",
    "fsdp/mlp/two-pass",
    "fsdp/tied/two-pass",
    "fsdp/mlp/layer-wise",
    "fsdp/tied/layer-wise",
    "fsdp/mlp/empty-rank",
    "fsdp/mlp/accumulation",
]


@pytest.mark.parametrize("key", FSDP)
def test_fsdp2_step_equals_one_process_on_the_union(two_ranks, key):
    """FSDP2 (fully_shard on two blocks and the root, then make_private(distributed=True)), float64, noise off: the
    reduce-scattered shards, all-gathered back, equal the single-process step on the union of the batches. 1e-12 as
    for DDP: only the order of float64 additions differs. The shards are real: the gradients are DTensors whose local
    rows are the rank's part of dimension 0 (rank 0 holds ceil(rows / 2))."""
    r = two_ranks[key]
    assert r["norm"] > 0.01
    assert r["ranks_equal"], "ranks hold different gradients"
    assert r["rel_err"] < 1e-12
    assert r["grad_dtypes"] == ["torch.float64"]
    assert r["local_rows"] == [r["full_rows"][k] - r["full_rows"][k] // 2 for k in range(len(r["full_rows"]))]


def test_fsdp2_mixed_precision_param_dtype(two_ranks):
    """MixedPrecisionPolicy(param_dtype=float32) on float64 parameters: the DP layers compute in float32 (the step
    equals a float32 single process to float32 rounding: relative 1e-5 is ~100 float32 ulps for sums of a few hundred
    terms), and the gradient written to the float64 shards is float64."""
    r = two_ranks["fsdp/mlp/mixed-precision"]
    assert r["norm"] > 0.01 and r["ranks_equal"]
    assert r["rel_err"] < 1e-5
    assert r["grad_dtypes"] == ["torch.float64"]


def test_fsdp2_noise_is_added_once_per_element(two_ranks):
    """Empty steps on a sharded (65, 64) Linear (shards of 33 and 32 rows): every element of the reduce-scattered
    gradient has noise std sigma R / B, not sqrt(2) off. 42,250 draws: relative standard error 0.34%, so 3% is ~9 of
    them, and sqrt(2) is 40% away."""
    r = two_ranks["fsdp/noise"]
    assert r["n"] > 40_000
    assert abs(r["std"] / r["expected"] - 1) < 0.03


def test_fsdp2_remove_one_sensitivity_across_ranks(two_ranks):
    """As for DDP: one adversarially large sample on rank 1 moves the sharded model's update by exactly R / B."""
    r = two_ranks["fsdp/sensitivity"]
    assert r["R"] * (1 - 1e-5) <= r["delta_times_B"] <= r["R"] * (1 + 1e-5)


@pytest.mark.parametrize("key", ["overlap/layer-wise", "overlap/layer-wise/two-pass"])
def test_layer_wise_buckets_are_all_reduced_during_backward(two_ranks, key):
    """One-parameter buckets, layer-wise groups on a 3-layer MLP: each layer's two buckets start when its group's
    sums are final, while the layers below it have yet to run backward (2, then 1, then 0 of them), in the fixed
    reverse-parameter order on both ranks; the result is still the single-process step on the union (1e-12)."""
    r = two_ranks[key]
    assert r["norm"] > 0.01 and r["ranks_equal"] and r["rel_err"] < 1e-12
    assert r["n_params"] == 6 and r["n_layers"] == 3
    assert r["launches"] == [[2, 2, 1, 1, 0, 0]] * 2


def test_all_layer_buckets_start_when_the_one_group_is_final(two_ranks):
    """All-layer clipping: no sum is final before every layer's norm is in, so every bucket starts at the last."""
    r = two_ranks["overlap/all-layer"]
    assert r["norm"] > 0.01 and r["ranks_equal"] and r["rel_err"] < 1e-12
    assert r["launches"] == [[0] * 6] * 2


def test_a_rank_without_backward_launches_the_same_buckets_at_the_step(two_ranks):
    """Rank 1 has an empty batch and runs no forward or backward: its noise-only shares are final at step(), where it
    launches the buckets in the same order rank 0 launched them during backward; the sum is exact."""
    r = two_ranks["overlap/layer-wise/idle-rank"]
    assert r["norm"] > 0.01 and r["ranks_equal"] and r["rel_err"] < 1e-12
    assert r["launches"] == [[2, 2, 1, 1, 0, 0], [-1] * 6]


@pytest.mark.parametrize("key", ["nonfinite/ddp", "nonfinite/fsdp"])
def test_a_sample_dropped_on_one_rank_gives_the_step_without_it(two_ranks, key):
    """nonfinite="drop", noise on with one seed: rank 1's sample with an inf input is dropped there (its own
    counter says 1, rank 0's 0) and the global step equals the data-parallel step without it, same noise. 1e-12:
    float64, the same non-zero terms added in another order (and rank 1's G rows rounded as g / 3 * 3 vs g / 2 * 2
    under the mean)."""
    r = two_ranks[key]
    assert r["finite"] and r["ranks_equal"]
    assert r["dropped"] == [[0, 1], [0, 0]]
    assert r["rel_err"] < 1e-12


@pytest.mark.parametrize("key", ["noise/os-seeds", "noise/same-seed"])
def test_noise_is_added_once_for_the_global_step(two_ranks, key):
    """Empty steps on both ranks: the summed noise has std sigma R / B, not sqrt(2) times more (both ranks adding
    the full noise, or one seed shared) nor less (each rank's share not summed). 41,600 draws: the std estimate's
    relative standard error is 1 / sqrt(2n) = 0.35%, so 3% is ~9 standard errors, and sqrt(2) is 40% away."""
    r = two_ranks[key]
    assert r["n"] > 40_000
    assert abs(r["std"] / r["expected"] - 1) < 0.03


def test_remove_one_sensitivity_across_ranks(two_ranks):
    """Removing one (adversarially large) sample on rank 1 moves the summed update by R / B: clipped to R, and
    counted once. The lower bound shows the sample was really there and clipped (1e-6: Abadi's epsilon)."""
    r = two_ranks["sensitivity"]
    assert r["R"] * (1 - 1e-5) <= r["delta_times_B"] <= r["R"] * (1 + 1e-5)


@pytest.mark.parametrize("key", ["adaptive/bk", "adaptive/two-pass"])
def test_adaptive_clipping_across_ranks_equals_one_process(two_ranks, key):
    """Adaptive clipping, noise off: 3 steps of bounds and gradients on 2 ranks equal one process on the union (the
    counts summed across the ranks, as the gradients are; 1e-12 as above). The bounds moved from R."""
    r = two_ranks[key]
    assert r["rel_err"] < 1e-12
    assert all(abs(b / (r["R"] / 3**0.5) - 1) > 0.05 for b in r["bounds"][0])


def test_adaptive_count_noise_is_added_once(two_ranks):
    """2400 summed counts of empty steps: std sigma_b = 3 (relative standard error 1.4%, so 8% is ~5.5 of them),
    not sqrt(2) sigma_b (each rank adding all of it) nor sigma_b / sqrt(2) (the shares not summed)."""
    r = two_ranks["adaptive/count-noise"]
    assert r["n"] == 2400
    assert abs(r["std"] / 3.0 - 1) < 0.08


def test_fixed_size_batches_warn_that_the_accountant_assumes_poisson(two_ranks):
    assert two_ranks["fixed_size_warning"]["warned"], "no warning for 8 fixed-size batches in a row"


@pytest.mark.parametrize("case", ["masks/after", "masks/before"])
def test_ranks_with_different_masks_are_refused_at_the_step(two_ranks, case):
    """A coordinate pruned on one rank only gets the other rank's samples with its share of the noise alone
    (std 0.70 sigma R measured, 1.0 due): every rank refuses the step and keeps no gradient."""
    r = two_ranks["disagree"][case]
    assert r["error"] and "pruning masks" in r["error"], r
    assert r["grad_none"]


def test_ranks_with_the_same_masks_step(two_ranks):
    r = two_ranks["disagree"]["masks/same"]  # the same mask applied before make_private on one, after on the other
    assert r["error"] is None and not r["grad_none"]


def test_a_rank_continuing_an_earlier_run_alone_is_refused(two_ranks):
    """Its privacy account would differ from the others' (epsilon 1.00 against 0.96 measured)."""
    r = two_ranks["disagree"]["history"]
    assert r["error"] and "privacy account so far" in r["error"], r


def test_ranks_differing_in_secure_mode_are_refused(two_ranks):
    """One rank drawing the default Philox noise would put non-cryptographic noise into a secure run's sum."""
    r = two_ranks["disagree"]["secure"]
    assert r["error"] and "secure_mode" in r["error"], r


def test_one_generator_on_every_rank_draws_independent_shards():
    """The same seeded generator given on both ranks drew the same pattern on both shards (examples 2j and 2j + 1
    always in a step together). Now each rank's stream is its own: over 2000 shard positions at q = 0.5 the
    two ranks agree on about half (std 0.011); the same pattern would agree on all."""

    def seeded():
        return torch.Generator().manual_seed(0)

    a, b = (
        next(iter(DistributedPoissonSampler(4000, 0.5, rank=r, world_size=2, steps=1, generator=seeded())))
        for r in (0, 1)
    )  # fmt: skip
    x, y = torch.zeros(2000, dtype=torch.bool), torch.zeros(2000, dtype=torch.bool)
    x[torch.tensor(a) // 2], y[torch.tensor(b) // 2] = True, True
    assert abs((x == y).float().mean().item() - 0.5) < 0.07  # 6 std


def test_distributed_poisson_sampler_covers_each_example_with_rate_q():
    """Three ranks' shards are disjoint and cover the dataset; each example is in a global step with probability q
    (over 400 steps: binomial std sqrt(400 q (1-q)) = 8, so a count within 5 std of 80 for all 30 examples), and
    a rank's batch may be empty (q small)."""
    n, q, world, steps = 30, 0.2, 3, 400
    samplers = [
        DistributedPoissonSampler(
            n, q, rank=r, world_size=world, steps=steps, generator=torch.Generator().manual_seed(r)
        )
        for r in range(world)
    ]
    counts = torch.zeros(n)
    empties = 0
    for batches in zip(*samplers, strict=True):
        union = [i for b in batches for i in b]
        assert len(union) == len(set(union))
        for r, b in enumerate(batches):
            assert all(i % world == r for i in b)
            empties += len(b) == 0
        counts[union] += 1
    assert ((counts - steps * q).abs() < 5 * (steps * q * (1 - q)) ** 0.5).all()
    assert empties > 0
    assert samplers[0].expected_batch_size == n * q
    assert all(len(s) == steps for s in samplers)


def test_sampler_draws_are_secret_by_default():
    """Without a generator the draws come from OS entropy: torch.manual_seed does not repeat them."""
    torch.manual_seed(0)
    a = list(DistributedPoissonSampler(1000, 0.5, rank=0, world_size=2, steps=2))
    torch.manual_seed(0)
    b = list(DistributedPoissonSampler(1000, 0.5, rank=0, world_size=2, steps=2))
    assert a != b


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_whole_dataset_poisson_sampler_on_several_ranks_warns(one_process_group, monkeypatch):
    """poisson_loader on every rank draws each rank's batch over the whole dataset: one example in both ranks'
    batches of a step counts twice (2 R), at rate about 2 q. It warns, naming the distributed loader; the
    distributed sampler does not."""
    from dpkernels.data import PoissonBatchSampler

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.warns(UserWarning, match="several ranks.*distributed_poisson_loader"):
        PoissonBatchSampler(100, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DistributedPoissonSampler(100, 0.1, rank=0, world_size=2)


def test_fully_shard_after_make_private_is_refused_by_name(one_process_group):
    """FSDP2 swaps every parameter for a sharded one: the engine would noise stale tensors (one 2-rank step came out
    with a relative error of 1.0). Refused at the forward, naming the parameter."""
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model, _ = dpkernels.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=4
    )
    fully_shard(model)
    with pytest.raises(RuntimeError, match=r"parameter 0.weight was replaced.*fully_shard.*distributed=True"):
        model(torch.randn(4, 4))


def test_fully_shard_without_distributed_is_refused(one_process_group):
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fully_shard(model)
    with pytest.raises(ValueError, match=r"FSDP2's fully_shard.*distributed=True"):
        dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=4
        )


def test_fully_shard_on_a_layer_itself_is_refused_by_name(one_process_group):
    """fully_shard(layer) changes the layer's class (FSDPLinear): it cannot become a DP layer; apply it to blocks."""
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fully_shard(model[1])
    fully_shard(model)
    with pytest.raises(ValueError, match=r"module '1' is a Linear that fully_shard was applied to directly"):
        dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=4,
            distributed=True,
        )  # fmt: skip


def test_fsdp2_world_size_one_matches_the_plain_path(one_process_group):
    """One rank, fully_shard on a block and the root: the same step as the unsharded model (same seed, same noise)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    x = torch.randn(5, 4)
    grads = []
    for sharded in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 3))
        if sharded:
            fully_shard(model[0])
            fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = dpkernels.make_private(
            model, opt, noise_multiplier=1.0, expected_batch_size=5, seed=7, distributed=sharded
        )
        model(x).square().sum(1).mean().backward()
        opt.step()
        grads.append(torch.cat([getattr(p.grad, "full_tensor", p.grad.detach)().flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_distributed_without_process_group_is_a_clear_error():
    model = nn.Linear(4, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        dpkernels.make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, expected_batch_size=4,
            distributed=True,
        )  # fmt: skip


def test_world_size_one_matches_the_plain_path(one_process_group):
    """One rank: distributed=True gives the non-distributed step exactly (same seed, same noise)."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    grads = []
    for distributed in (False, True):
        torch.manual_seed(1)
        model = nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = dpkernels.make_private(
            model, opt, noise_multiplier=1.0, expected_batch_size=5, seed=7, distributed=distributed
        )
        model(x).square().sum(1).mean().backward()
        opt.step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.slow  # transformers' import and two processes: ~1-2 min on 2 cores
@pytest.mark.parametrize("extra", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_ddp_gpt2_example_runs_under_torchrun(tmp_path, extra):
    pytest.importorskip("transformers")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(ROOT / "examples" / "ddp_gpt2.py"), "--quick", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "on every rank: True" in run.stdout and "world size 2" in run.stdout
    assert "MiB of parameters and Adam state" in run.stdout


@pytest.fixture(scope="module")
def gpt2_ranks(tmp_path_factory):
    pytest.importorskip("transformers")
    return _launch(tmp_path_factory.mktemp("gpt2") / "results.json", "--gpt2")


# in the default suite (one more torchrun launch, ~40 s on 2 cores): the HF GPT-2 case runs in CI
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_hf_gpt2_two_ranks_equal_one_process(gpt2_ranks, kind):
    """A tiny Hugging Face GPT-2 (tied wte/lm_head, Conv1D, LayerNorm), DDP and FSDP2 (each block and the root
    fully_shard-ed), float64, noise off: equal to one process on the union of the batches (1e-12: only the order of
    float64 additions differs), for book-keeping, two-pass and layer-wise groups."""
    r = gpt2_ranks
    for how in ("bk", "two-pass", "layer-wise"):
        res = r[f"gpt2/{kind}/{how}"]
        assert res["norm"] > 0.01 and res["ranks_equal"], how
        assert res["rel_err"] < 1e-12, how


def _private_16(wrap: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(1)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 3))
    if wrap == "fsdp2-bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        fully_shard(model[0], mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return dpkernels.make_private(
        model, opt, noise_multiplier=1.0, expected_batch_size=5, dataset_size=100, seed=7, distributed=True
    )


def _losses_16(model, wrap: str) -> torch.Tensor:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=wrap == "data-parallel"):
        return model(x).float().square().sum(1)


def _full_grads(model) -> list[torch.Tensor | None]:
    return [None if p.grad is None else getattr(p.grad, "full_tensor", p.grad.detach)() for p in model.parameters()]


@pytest.mark.parametrize("wrap", ["data-parallel", "fsdp2-bf16"])
def test_16bit_mean_loss_is_refused(one_process_group, wrap):
    """A scalar mean loss through 16 bits (bf16 autocast with distributed=True; FSDP2's bf16 param_dtype) is
    refused at the first DP layer, before any per-sample work or all-reduce, as without data parallelism
    (tests/engine/test_amp.py)."""
    model, opt = _private_16(wrap)
    with pytest.raises(RuntimeError, match=r"DP layer '1' got the output gradients of a mean loss through 16 bits"):
        _losses_16(model, wrap).mean().backward()
    assert all(g is None for g in _full_grads(model))


@pytest.mark.parametrize("wrap", ["data-parallel", "fsdp2-bf16"])
def test_after_a_refused_16bit_mean_loss_the_next_step_is_a_fresh_one(one_process_group, wrap):
    """The same batch given per sample after the refusal is the step a fresh model takes, bit for bit (noise on, same
    seed), the refused pass uncounted. Under FSDP2 the refusal leaves FSDP's root mid-backward (its end-of-backward
    callback dropped): the next forward resets it, or it would compute with stale unsharded weights."""
    model, opt = _private_16(wrap)
    with pytest.raises(RuntimeError, match="mean loss through 16 bits"):
        _losses_16(model, wrap).mean().backward()
    opt.backward(_losses_16(model, wrap))
    opt.step()
    assert opt.accountant.steps == 1
    fresh, fresh_opt = _private_16(wrap)
    fresh_opt.backward(_losses_16(fresh, wrap))
    fresh_opt.step()
    for got, want in zip(_full_grads(model), _full_grads(fresh), strict=True):
        assert got is not None and want is not None and want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(_losses_16(model, wrap), _losses_16(fresh, wrap), rtol=0, atol=0)  # the update is used


_ARMED: list[bool] = []  # one entry: the next backward through _RaiseOnce raises


class _RaiseOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if _ARMED:
            _ARMED.pop()
            raise ValueError("an error between two blocks")
        return g


class _Boom(nn.Module):
    def forward(self, x):
        return _RaiseOnce.apply(x)


def _private_blocks(wrap: str, noise: float):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(1)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), _Boom(), nn.Sequential(nn.Linear(6, 3)))
    if wrap == "fsdp2":
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return dpkernels.make_private(
        model, opt, noise_multiplier=noise, expected_batch_size=5, dataset_size=100, seed=7, distributed=True
    )


def _losses_blocks(model) -> torch.Tensor:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    return model(x).square().sum(1)


def _full_params(model) -> list[torch.Tensor]:
    return [getattr(p, "full_tensor", p.detach)() for p in model.parameters()]


@pytest.mark.parametrize("then", ["next-step", "step-right-away"])
@pytest.mark.parametrize("noise", [0.0, 1.0])
@pytest.mark.parametrize("wrap", ["data-parallel", "fsdp2"])
def test_after_an_exception_between_two_blocks_in_backward_training_goes_on_as_fresh(
    one_process_group, wrap, noise, then
):
    """An exception raised by a module between two (FSDP2) blocks during backward, after the last block's DP layer
    and FSDP's root pre-backward ran: the pass is dropped and not counted; the next step is a fresh model's, bit for
    bit (noise off, or on with the same seed), and the model computes with the updated weights. A step taken right
    after the failure releases a noised gradient of no sample: counted, and the same as a fresh model's empty step."""
    model, opt = _private_blocks(wrap, noise)
    _ARMED[:] = [True]
    with pytest.raises(ValueError, match="between two blocks"):
        opt.backward(_losses_blocks(model))
    assert not _ARMED  # it raised inside backward, not at the forward
    assert opt.accountant.steps == 0
    fresh, fresh_opt = _private_blocks(wrap, noise)
    if then == "step-right-away":
        opt.step()
        fresh_opt.step()
        assert opt.accountant.steps == 1
    opt.backward(_losses_blocks(model))
    opt.step()
    fresh_opt.backward(_losses_blocks(fresh))
    fresh_opt.step()
    assert opt.accountant.steps == fresh_opt.accountant.steps == (1 if then == "next-step" else 2)
    for got, want in zip(_full_grads(model), _full_grads(fresh), strict=True):
        assert got is not None and want is not None and want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(_full_params(model), _full_params(fresh), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(_losses_blocks(model), _losses_blocks(fresh), rtol=0, atol=0)


def test_make_private_again_on_a_fsdp2_model_recovers_from_an_exception_in_backward(one_process_group):
    """make_private called again on the same fully_shard model: the new engine's FSDP reset runs behind the privacy
    guard's pre-hook (which stays first, or the guard refuses the forward), and still resets FSDP after a backward
    that raised: the step after it is a fresh model's (noise off), bit for bit."""
    model, opt = _private_blocks("fsdp2", 0.0)
    model, opt = dpkernels.make_private(
        model, opt.original_optimizer, noise_multiplier=0.0, expected_batch_size=5, dataset_size=100, distributed=True
    )
    _ARMED[:] = [True]
    with pytest.raises(ValueError, match="between two blocks"):
        opt.backward(_losses_blocks(model))
    opt.backward(_losses_blocks(model))
    opt.step()
    fresh, fresh_opt = _private_blocks("fsdp2", 0.0)
    fresh_opt.backward(_losses_blocks(fresh))
    fresh_opt.step()
    for got, want in zip(_full_params(model), _full_params(fresh), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(_losses_blocks(model), _losses_blocks(fresh), rtol=0, atol=0)
