"""Run under torchrun (gloo, CPU): data-parallel DP steps compared with the single-process step.

Every rank runs each scenario; rank 0 also runs the single-process step on the union of the ranks'
batches and writes, per scenario, the relative error and the measured numbers to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

import dpkernels
from tests.engine.zoo import BY_NAME, batch, batch_loss

DT = torch.float64
B = 6  # the global batch, split over the ranks
R = 0.3  # small enough that most samples of the zoo models are clipped


def _step(case, model, x, y, *, distributed, strategy="bk", groups="all-layer", sigma=0.0, seed=None, accum=1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model,
        opt,
        noise_multiplier=sigma,
        max_grad_norm=R,
        expected_batch_size=float(B),
        strategy=strategy,
        groups=groups,
        accumulation_steps=accum,
        seed=seed,
        distributed=distributed,
        **kw,
    )
    for xs, ys in zip(x.tensor_split(accum), y.tensor_split(accum), strict=True):
        loss = batch_loss(case, model(xs), ys, "mean")
        opt.backward(loss)
    opt.step()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]), opt


def _sharded(model: nn.Module, mp=None) -> nn.Module:
    """``model`` under FSDP2: a Sequential's layers in two blocks, each fully_shard-ed, and the root (whose group
    holds what is left, e.g. a tied embedding/head). Same parameters, same order, same function."""
    from torch.distributed.fsdp import fully_shard

    kw = {} if mp is None else {"mp_policy": mp}
    if isinstance(model, nn.Sequential) and len(model) > 2:
        k = len(model) // 2
        model = nn.Sequential(nn.Sequential(*model[:k]), nn.Sequential(*model[k:]))
        for block in model:
            fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def _fsdp_step(case, model, x, y, *, strategy="bk", groups="all-layer", sigma=0.0, seed=None, accum=1, mp=None, **kw):
    """One DP step of the FSDP2-sharded ``model``: the full gradient (its shards all-gathered)."""
    model = _sharded(model, mp)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model,
        opt,
        noise_multiplier=sigma,
        max_grad_norm=R,
        expected_batch_size=float(B),
        strategy=strategy,
        groups=groups,
        accumulation_steps=accum,
        seed=seed,
        distributed=True,
        **kw,
    )
    for xs, ys in zip(x.tensor_split(accum), y.tensor_split(accum), strict=True):
        opt.backward(batch_loss(case, model(xs), ys, "mean"))
    opt.step()
    return torch.cat([p.grad.full_tensor().flatten() for p in model.parameters() if p.requires_grad]), opt


def fsdp_exact(case_name, rank, world, *, strategy="bk", groups="all-layer", empty_rank=None, accum=1, mp=False):
    """Max relative error of the FSDP2 step (reduce-scattered, all-gathered back) against one process on the
    union of the ranks' batches."""
    case = BY_NAME[case_name]
    x, y = batch(case, B)
    policy = None
    if mp:  # float64 parameters computed in float32: the single process runs a float32 copy
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.float32)
    mine, opt = _fsdp_step(
        case,
        case.build(),
        _split(x, rank, world, empty_rank),
        _split(y, rank, world, empty_rank),
        strategy=strategy,
        groups=groups,
        accum=accum,
        mp=policy,
    )
    grad_dtypes = sorted({str(p.grad.dtype) for p in opt.engine._params})
    local = [p.grad.to_local().shape[0] for p in opt.engine._params]
    full = [p.shape[0] for p in opt.engine._params]
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    same = all(torch.equal(every[0], e) for e in every)
    if empty_rank is None:
        x = torch.cat([x[r::world] for r in range(world)])
        y = torch.cat([y[r::world] for r in range(world)])
    model = case.build()
    if mp:
        model, x, y = model.float(), x.float() if x.is_floating_point() else x, y.float()
    single, _ = _step(case, model, x, y, distributed=False, strategy=strategy, groups=groups, accum=accum)
    err = ((mine - single.to(mine.dtype)).norm() / single.norm()).item()
    return {"rel_err": err, "ranks_equal": same, "norm": single.norm().item(), "grad_dtypes": grad_dtypes,
            "local_rows": local, "full_rows": full}  # fmt: skip


def fsdp_noise(rank, world):
    """Std of the reduce-scattered noise of empty steps on a sharded (65, 64) Linear (uneven shards): sigma R / B."""
    torch.manual_seed(0)
    out = []
    x = torch.zeros(0, 64, dtype=DT)
    for _ in range(10):
        g, _ = _fsdp_step(BY_NAME["mlp"], nn.Sequential(nn.Linear(64, 65)).to(DT), x, x[:, :1], sigma=1.0)
        out.append(g)
    g = torch.cat(out)
    return {"std": g.std().item(), "expected": 1.0 * R / B, "n": g.numel()}


def fsdp_sensitivity(rank, world):
    """Remove-one across ranks on the sharded MLP: an adversarially large sample on rank 1 moves the update by R / B."""
    case = BY_NAME["mlp"]
    x, y = batch(case, B)
    x = x.clone()
    x[1] *= 1e4
    with_it, _ = _fsdp_step(case, case.build(), x[rank::world], y[rank::world])
    keep = [i for i in range(B) if i != 1]
    xs, ys = x[keep], y[keep]
    sub = [i for i in range(len(keep)) if keep[i] % world == rank]
    without, _ = _fsdp_step(case, case.build(), xs[sub], ys[sub])
    return {"delta_times_B": ((with_it - without).norm() * B).item(), "R": R}


def overlap(rank, world, *, groups, idle_rank=None, strategy="bk"):
    """DDP with one-parameter all-reduce buckets: each launched when its clipping group's sums are final (during
    backward for layer-wise groups); ``idle_rank`` has an empty batch and runs no forward or backward at all, so
    its buckets are all launched at step(). Against one process on the union of the batches."""
    case = BY_NAME["mlp"]
    x, y = batch(case, B)
    xs, ys = (
        (x[:0], y[:0]) if rank == idle_rank else (x, y) if idle_rank is not None else (x[rank::world], y[rank::world])
    )
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=float(B), groups=groups,
        strategy=strategy, distributed=True,
    )  # fmt: skip
    opt.parallel.bucket_bytes = 1  # one parameter per bucket
    if rank != idle_rank:
        opt.backward(batch_loss(case, model(xs), ys, "mean"))
    opt.step()
    mine = torch.cat([p.grad.flatten() for p in model.parameters()])
    if idle_rank is None:
        x = torch.cat([x[r::world] for r in range(world)])
        y = torch.cat([y[r::world] for r in range(world)])
    single, _ = _step(case, case.build(), x, y, distributed=False, groups=groups, strategy=strategy)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    launches = [None] * world
    dist.all_gather_object(launches, opt.parallel.launches)
    return {"rel_err": ((mine - single).norm() / single.norm()).item(), "norm": single.norm().item(),
            "ranks_equal": all(torch.equal(every[0], e) for e in every), "launches": launches,
            "n_params": len(list(model.parameters())), "n_layers": len(opt.engine.ties)}  # fmt: skip


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=2, n_head=2)
    cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = 0.0  # the same function on every rank
    return GPT2LMHeadModel(cfg).to(DT)


def gpt2_exact(rank, world, *, fsdp, strategy="bk", groups="all-layer"):
    """A tiny Hugging Face GPT-2 (tied wte/lm_head, Conv1D, LayerNorm, two blocks), DDP or FSDP2 (each block and the
    root fully_shard-ed) against one process on the union of the batches."""
    import torch.nn.functional as F

    x = torch.randint(0, 40, (B, 8), generator=torch.Generator().manual_seed(0))

    def run(model, ids, distributed):
        if fsdp and distributed:
            from torch.distributed.fsdp import fully_shard

            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        model, opt = dpkernels.make_private(
            model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=float(B), strategy=strategy,
            groups=groups, distributed=distributed,
        )  # fmt: skip
        logits = model(ids).logits[:, :-1]
        per_sample = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(ids), -1)
        opt.backward(per_sample.mean(1))
        opt.step()
        full = [getattr(p.grad, "full_tensor", p.grad.detach)() for p in model.parameters() if p.requires_grad]
        return torch.cat([g.flatten() for g in full])

    mine = run(_gpt2(), x[rank::world], True)
    single = run(_gpt2(), torch.cat([x[r::world] for r in range(world)]), False)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    same = all(torch.equal(every[0], e) for e in every)
    err = ((mine - single).norm() / single.norm()).item()
    return {"rel_err": err, "ranks_equal": same, "norm": single.norm().item()}


def _split(x: torch.Tensor, rank: int, world: int, empty_rank: int | None) -> torch.Tensor:
    if empty_rank is not None:
        return x[:0] if rank == empty_rank else x
    return x[rank::world]


def exact(case_name, rank, world, *, strategy="bk", groups="all-layer", empty_rank=None, accum=1):
    """Max relative error of the all-reduced step against one process on the union of the batches."""
    case = BY_NAME[case_name]
    x, y = batch(case, B)
    mine, _ = _step(
        case,
        case.build(),
        _split(x, rank, world, empty_rank),
        _split(y, rank, world, empty_rank),
        distributed=True,
        strategy=strategy,
        groups=groups,
        accum=accum,
    )
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    same = all(torch.equal(every[0], e) for e in every)
    if empty_rank is not None:
        x, y = x, y  # the non-empty rank held the whole batch
    else:  # the union, in the order of the ranks' shards (the sum does not depend on it)
        x = torch.cat([x[r::world] for r in range(world)])
        y = torch.cat([y[r::world] for r in range(world)])
    single, _ = _step(case, case.build(), x, y, distributed=False, strategy=strategy, groups=groups, accum=accum)
    err = ((mine - single).norm() / single.norm()).item()
    return {"rel_err": err, "ranks_equal": same, "norm": single.norm().item()}


def nonfinite(rank, world, *, fsdp):
    """nonfinite="drop" across ranks, noise on (one seed, so both runs draw the same noise): sample 1 (rank 1's) has
    an inf input and is dropped there; the all-reduced (FSDP2: reduce-scattered) step equals the data-parallel step
    without that sample, and each rank counts its own dropped samples."""
    case = BY_NAME["mlp"]
    x, y = batch(case, B)
    x[1].view(-1)[0] = float("inf")
    kw = dict(sigma=1.0, seed=5, nonfinite="drop")
    steps, dropped = [], []
    for without in (False, True):
        xs, ys = x[rank::world], y[rank::world]  # rank 0: samples 0, 2, 4; rank 1: 1, 3, 5
        if without and rank == 1:
            xs, ys = xs[1:], ys[1:]
        if fsdp:
            g, opt = _fsdp_step(case, case.build(), xs, ys, **kw)
        else:
            g, opt = _step(case, case.build(), xs, ys, distributed=True, **kw)
        steps.append(g)
        every: list = [None] * world
        dist.all_gather_object(every, opt.engine.dropped_samples())
        dropped.append(every)
    mine, without = steps
    every_g = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every_g, mine)
    err = ((mine - without).norm() / without.norm()).item()
    return {"rel_err": err, "ranks_equal": all(torch.equal(every_g[0], e) for e in every_g), "dropped": dropped,
            "finite": bool(torch.isfinite(mine).all())}  # fmt: skip


def noise(rank, world, *, seed):
    """Std of the all-reduced noise of empty steps: sigma R / B, whatever the number of ranks."""
    torch.manual_seed(0)
    case = BY_NAME["mlp"]
    model = nn.Sequential(nn.Linear(64, 64)).to(DT)
    x = torch.zeros(0, 64, dtype=DT)
    out = []
    for step in range(10):
        g, _ = _step(case, model, x, x, distributed=True, sigma=1.0, seed=None if seed is None else seed + step)
        out.append(g)
    g = torch.cat(out)
    return {"std": g.std().item(), "expected": 1.0 * R / B, "n": g.numel()}


def sensitivity(rank, world):
    """Remove-one across ranks: an adversarially large sample on rank 1 moves the update by at most R / B."""
    case = BY_NAME["mlp"]
    x, y = batch(case, B)
    x = x.clone()
    x[1] *= 1e4  # row 1 lands on rank 1; its gradient is far above R
    with_it, _ = _step(case, case.build(), x[rank::world], y[rank::world], distributed=True)
    keep = [i for i in range(B) if i != 1]
    xs, ys = x[keep], y[keep]
    sub = [i for i in range(len(keep)) if keep[i] % world == rank]
    without, _ = _step(case, case.build(), xs[sub], ys[sub], distributed=True)
    return {"delta_times_B": ((with_it - without).norm() * B).item(), "R": R}


def adaptive(rank, world, *, strategy):
    """Adaptive clipping across the ranks, noise off: each step's bounds and gradients (3 steps, the bounds moving)
    against one process on the union of the ranks' batches; the counts are summed like the gradients."""
    case = BY_NAME["mlp"]

    def run(distributed):
        model = case.build()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        model, opt = dpkernels.make_private(
            model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=float(B), groups="layer-wise",
            strategy=strategy, distributed=distributed,
            adaptive_clipping=dict(count_noise_multiplier=0.0, target_quantile=0.5, lr=0.5),
        )  # fmt: skip
        out = []
        for t in range(3):
            x, y = batch(case, B, seed=t)
            if distributed:
                x, y = x[rank::world], y[rank::world]
            else:
                x = torch.cat([x[r::world] for r in range(world)])
                y = torch.cat([y[r::world] for r in range(world)])
            opt.backward(batch_loss(case, model(x), y, "mean"))
            opt.step()
            out.append(torch.tensor(opt.max_grad_norm, dtype=DT))
            out += [p.grad.flatten() for p in model.parameters() if p.requires_grad]
            opt.zero_grad()
        return torch.cat(out)

    mine, single = run(True), run(False)
    bounds = [mine[:3].tolist()]  # the bounds after step 1, to show they moved
    return {"rel_err": ((mine - single).norm() / single.norm()).item(), "bounds": bounds, "R": R}


def adaptive_count_noise(rank, world):
    """Empty steps, sigma_b = 3: the summed released counts have std sigma_b whatever the number of ranks."""
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)]).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=float(B), groups="param-wise",
        distributed=True, adaptive_clipping=dict(count_noise_multiplier=3.0, lr=1e-3),
    )  # fmt: skip
    x = torch.zeros(0, 2, dtype=DT)
    counts = []
    for _ in range(300):
        model(x).sum().backward()
        opt.step()
        counts.append(opt.engine.adaptive.released.clone())
    c = torch.cat(counts)
    return {"std": c.std().item(), "n": c.numel()}


def fixed_size_warning(rank, world):
    case = BY_NAME["mlp"]
    x, y = batch(case, B)
    model = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = dpkernels.make_private(
        model, opt, noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=float(B), distributed=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(9):
            batch_loss(case, model(x[:3]), y[:3], "mean").backward()
            opt.step()
            opt.zero_grad()
    return {"warned": [str(w.message) for w in caught if "Poisson" in str(w.message)]}


def disagree(rank, world):
    """Ranks whose DP configurations differ after make_private: the step is refused on every rank (no gradient
    left behind), and the same configuration built separately on each rank is accepted. Without the check a
    mask on rank 1 only left its pruned coordinates with noise std 0.70 sigma R (rank 0's share only) on rank
    0's samples, and a rank continuing an earlier run reported another epsilon (1.00 against 0.96)."""
    from dpkernels.pruning import apply_masks

    keep = torch.ones(4, 64, dtype=torch.bool)
    keep[:, :32] = False
    out = {}

    def step(name, *, mask_before=(), mask_after=(), earlier_steps=0, secure=()):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 4)).to(DT)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        if rank in mask_before:
            apply_masks(model, {"0.weight": keep})
        try:
            if rank < earlier_steps:  # rank 0 ran private steps of its own first: its account differs
                model, dp = dpkernels.make_private(model, opt, noise_multiplier=1.0, sample_rate=0.1, dataset_size=60)
                for _ in range(2):
                    dp.backward(model(torch.randn(2, 64, dtype=DT)).sum())
                    dp.step()
                opt = dp.original_optimizer
            model, dp = dpkernels.make_private(
                model,
                opt,
                noise_multiplier=1.0,
                max_grad_norm=R,
                sample_rate=0.1,
                dataset_size=60,
                distributed=True,
                secure_mode=rank in secure,
            )
            if rank in mask_after:
                apply_masks(model, {"0.weight": keep})
            dp.backward(model(torch.randn(3, 64, dtype=DT)).sum())
            dp.step()
            out[name] = {"error": None, "grad_none": model[0].weight.grad is None}
        except ValueError as e:
            out[name] = {"error": str(e), "grad_none": model[0].weight.grad is None}

    step("masks/after", mask_after=(1,))
    step("masks/before", mask_before=(1,))
    step("masks/same", mask_before=(0,), mask_after=(1,))
    step("history", earlier_steps=1)
    step("secure", secure=(1,))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpt2", action="store_true", help="only the Hugging Face GPT-2 scenarios (slow: transformers)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {}
    if args.gpt2:
        for fsdp in (False, True):
            kind = "fsdp" if fsdp else "ddp"
            results[f"gpt2/{kind}/bk"] = gpt2_exact(rank, world, fsdp=fsdp)
            results[f"gpt2/{kind}/two-pass"] = gpt2_exact(rank, world, fsdp=fsdp, strategy="two-pass")
            results[f"gpt2/{kind}/layer-wise"] = gpt2_exact(rank, world, fsdp=fsdp, groups="layer-wise")
        _write(args.out, rank, world, results)
        return
    for case in ("mlp", "conv2d", "embedding", "layernorm", "tied"):
        results[f"exact/{case}/bk"] = exact(case, rank, world)
    results["exact/mlp/two-pass"] = exact("mlp", rank, world, strategy="two-pass")
    results["exact/tied/two-pass"] = exact("tied", rank, world, strategy="two-pass")
    results["exact/mlp/layer-wise"] = exact("mlp", rank, world, groups="layer-wise")
    results["exact/tied/layer-wise"] = exact("tied", rank, world, groups="layer-wise")
    results["exact/mlp/empty-rank"] = exact("mlp", rank, world, empty_rank=1)
    results["exact/mlp/accumulation"] = exact("mlp", rank, world, accum=2)
    for case in ("mlp", "conv2d", "embedding", "layernorm", "tied"):
        results[f"fsdp/{case}/bk"] = fsdp_exact(case, rank, world)
    results["fsdp/mlp/two-pass"] = fsdp_exact("mlp", rank, world, strategy="two-pass")
    results["fsdp/tied/two-pass"] = fsdp_exact("tied", rank, world, strategy="two-pass")
    results["fsdp/mlp/layer-wise"] = fsdp_exact("mlp", rank, world, groups="layer-wise")
    results["fsdp/tied/layer-wise"] = fsdp_exact("tied", rank, world, groups="layer-wise")
    results["fsdp/mlp/empty-rank"] = fsdp_exact("mlp", rank, world, empty_rank=1)
    results["fsdp/mlp/accumulation"] = fsdp_exact("mlp", rank, world, accum=2)
    results["fsdp/mlp/mixed-precision"] = fsdp_exact("mlp", rank, world, mp=True)
    results["fsdp/noise"] = fsdp_noise(rank, world)
    results["fsdp/sensitivity"] = fsdp_sensitivity(rank, world)
    results["overlap/layer-wise"] = overlap(rank, world, groups="layer-wise")
    results["overlap/layer-wise/two-pass"] = overlap(rank, world, groups="layer-wise", strategy="two-pass")
    results["overlap/all-layer"] = overlap(rank, world, groups="all-layer")
    results["overlap/layer-wise/idle-rank"] = overlap(rank, world, groups="layer-wise", idle_rank=1)
    results["nonfinite/ddp"] = nonfinite(rank, world, fsdp=False)
    results["nonfinite/fsdp"] = nonfinite(rank, world, fsdp=True)
    results["noise/os-seeds"] = noise(rank, world, seed=None)
    results["noise/same-seed"] = noise(rank, world, seed=1234)
    results["sensitivity"] = sensitivity(rank, world)
    results["fixed_size_warning"] = fixed_size_warning(rank, world)
    results["disagree"] = disagree(rank, world)
    results["adaptive/bk"] = adaptive(rank, world, strategy="bk")
    results["adaptive/two-pass"] = adaptive(rank, world, strategy="two-pass")
    results["adaptive/count-noise"] = adaptive_count_noise(rank, world)
    _write(args.out, rank, world, results)


def _write(out, rank, world, results) -> None:
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, **results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    assert math.isfinite(R)
    main()
