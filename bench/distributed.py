"""Data-parallel scaling of DP training: ``python -m bench --nproc 1,2 --sharding ddp,fsdp --device cpu``.

For each (model, mode, sharding, number of processes N) one ``torchrun --nproc_per_node N`` launch of this
module's worker: every rank builds the model (same seed: the same initial weights), draws its own batch of
B samples (weak scaling: the global batch is N B, and the DP modes divide by it), and trains it

- ddp:  nondp inside DistributedDataParallel; dpkernels with make_private(..., distributed=True);
- fsdp: FSDP2, fully_shard on every transformer/residual block and the root, then the same as ddp;

with a barrier before each timed step. Each rank reports its step times, its peak memory (bench.worker's
measure: CUDA allocator peak, or the CPU process's peak anonymous RSS over the timed steps) and the bytes of
parameters, gradients and optimizer state it holds. The harness writes per-rank rows and, per (model, mode,
sharding), the scaling from N = 1: global samples/s at N over that at 1 (ideal N). On the CPU every rank
shares the machine's cores (gloo, one thread per rank unless --threads), so the CPU figures show the
overheads (collectives, sharding), not a multi-device speed-up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARDINGS = ("ddp", "fsdp")
MODES = ("nondp", "dpk-bk", "dpk-two-pass", "dpk-layer-wise")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_bytes(tensors: Any) -> int:
    total = 0
    for t in tensors:
        t = getattr(t, "to_local", lambda t=t: t)()  # a DTensor's shard
        total += t.numel() * t.element_size()
    return total


def _shard_blocks(model: Any) -> int:
    """fully_shard every block (a module whose class name ends in Block, or a torchvision residual block, or a
    Hugging Face GPT2Block) and the root; returns how many blocks."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in model.modules() if m is not model and type(m).__name__.endswith(("Block", "Bottleneck"))]
    for m in blocks:
        fully_shard(m)
    fully_shard(model)
    return len(blocks)


def run_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank's share of a case (under torchrun)."""
    import torch
    import torch.distributed as dist

    from . import modes as M
    from .models import build
    from .worker import _cpu_memory, _proc_status, _quantiles, _reset_hwm

    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    torch.set_num_threads(int(spec.get("threads") or 1))
    res: dict[str, Any] = {k: spec[k] for k in ("model", "batch", "mode", "sharding", "device")}
    res.update(rank=rank, nproc=world)
    mem0 = _proc_status()
    work = build(spec["model"], spec["batch"], device, seed=spec.get("seed", 0))
    g = torch.Generator().manual_seed(1000 + rank)  # this rank's own batch, the same model on every rank
    if work.x.is_floating_point():
        work.x = torch.randn(work.x.shape, generator=g).to(device)
    else:
        work.x = torch.randint(0, work.config.args["vocab"], work.x.shape, generator=g).to(device)
    model = work.model
    blocks = _shard_blocks(model) if spec["sharding"] == "fsdp" else 0
    mode = spec["mode"]
    opt: Any = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    backward = None
    if mode == "nondp":
        if spec["sharding"] == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        import dpkernels

        groups, strategy = M.DPK_MODES[mode]
        model, opt = dpkernels.make_private(
            model, opt, noise_multiplier=M.NOISE_MULTIPLIER, max_grad_norm=M.MAX_GRAD_NORM,
            expected_batch_size=float(spec["batch"] * world), groups=groups, strategy=strategy, seed=0,
            distributed=True,
        )  # fmt: skip
        backward = opt.backward

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = work.loss(model(work.x))
        (backward or (lambda x: x.backward()))(loss)
        opt.step()
        return float(loss.detach())

    for _ in range(spec["warmup"]):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    hwm = _reset_hwm() if not cuda else None
    times = []
    for _ in range(spec["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        res["mem_kind"] = "torch.cuda.max_memory_allocated over the timed steps"
    else:
        res.update(_cpu_memory(mem0, bool(hwm)))
    params = [p for p in model.parameters()]
    res["param_bytes"] = _local_bytes(params)
    res["grad_bytes"] = _local_bytes([p.grad for p in params if p.grad is not None])
    state = getattr(opt, "state", {})
    res["optim_state_bytes"] = _local_bytes(
        v for st in state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0
    )
    res["fsdp_blocks"] = blocks
    res["step_time"] = _quantiles(times)
    res["samples_per_s"] = spec["batch"] * world / res["step_time"]["median_s"]  # the global batch
    dist.destroy_process_group()
    return res


def launch(spec: dict[str, Any], nproc: int, timeout: float) -> list[dict[str, Any]]:
    """One torchrun launch of a case on ``nproc`` processes: the ranks' results (an error row if it failed)."""
    with tempfile.TemporaryDirectory(prefix="dpk-dist-") as tmp:
        out = os.path.join(tmp, "rank")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), "-m", "bench.distributed", "--rank-worker",
            json.dumps(spec), out,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [{**spec, "nproc": nproc, "status": "error", "error": f"killed after {timeout:.0f} s"}]
        rows = []
        for r in range(nproc):
            path = f"{out}.{r}.json"
            if os.path.exists(path):
                with open(path) as f:
                    rows.append({**json.load(f), "status": "ok"})
        if len(rows) == nproc:
            return rows
        tail = (proc.stderr or proc.stdout or "")[-1500:]
        return [{**spec, "nproc": nproc, "status": "error", "error": f"exit {proc.returncode}: {tail.strip()[-600:]}"}]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, batch, mode, sharding, nproc): the slowest rank's median step time (the step waits for it),
    the global samples/s, the largest per-rank memory, and the scaling against nproc = 1."""
    by: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by.setdefault((r["model"], r["batch"], r["mode"], r["sharding"], r["nproc"]), []).append(r)
    out = []
    for (model, batch, mode, sharding, n), rs in by.items():
        t = max(r["step_time"]["median_s"] for r in rs)
        out.append(
            {
                "model": model, "batch_per_rank": batch, "mode": mode, "sharding": sharding, "nproc": n,
                "step_s": t, "samples_per_s": batch * n / t,
                "peak_mem_bytes_max_rank": max((r.get("peak_mem_bytes") or 0) for r in rs),
                "param_bytes_rank0": rs[0]["param_bytes"], "grad_bytes_rank0": rs[0]["grad_bytes"],
            }
        )  # fmt: skip
    base = {(s["model"], s["batch_per_rank"], s["mode"], s["sharding"]): s for s in out if s["nproc"] == 1}
    for s in out:
        b = base.get((s["model"], s["batch_per_rank"], s["mode"], s["sharding"]))
        s["scaling_vs_1"] = s["samples_per_s"] / b["samples_per_s"] if b else None
    return out


def markdown(info: dict[str, Any], summary: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    mib = 2**20
    lines = [
        f"# Data-parallel DP training: {info['device_name']}",
        "",
        f"`{info['command']}` ({info['timestamp']}, torch {info['torch']}). Weak scaling: B samples per rank, "
        "the global batch N B. step = the slowest rank's median step; scaling = global samples/s over N = 1's "
        "(ideal: N). Memory: the largest rank's peak (" + info["memory_measure"] + "); params/grads: the bytes "
        "rank 0 holds (sharded under FSDP2).",
        "",
        "| model | B/rank | mode | sharding | N | step (ms) | samples/s | scaling | peak mem/rank (MiB) "
        "| params rank 0 (MiB) | grads rank 0 (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(summary, key=lambda s: (s["model"], s["sharding"], s["mode"], s["nproc"])):
        sc = f"{s['scaling_vs_1']:.2f}" if s["scaling_vs_1"] is not None else "-"
        lines.append(
            f"| {s['model']} | {s['batch_per_rank']} | {s['mode']} | {s['sharding']} | {s['nproc']} | "
            f"{1e3 * s['step_s']:.1f} | {s['samples_per_s']:.1f} | {sc} | {s['peak_mem_bytes_max_rank'] / mib:.1f} | "
            f"{s['param_bytes_rank0'] / mib:.2f} | {s['grad_bytes_rank0'] / mib:.2f} |"
        )
    errors = [r for r in rows if r.get("status") != "ok"]
    for r in errors:
        lines.append(f"\n{r['mode']} {r['sharding']} N={r['nproc']}: {r['status']}: {r.get('error', '')[:300]}")
    lines += ["", "Per rank (median step ms, peak MiB):", ""]
    for r in rows:
        if r.get("status") == "ok":
            lines.append(
                f"- {r['model']} {r['mode']} {r['sharding']} N={r['nproc']} rank {r['rank']}: "
                f"{1e3 * r['step_time']['median_s']:.1f} ms, {(r.get('peak_mem_bytes') or 0) / mib:.1f} MiB"
            )
    return "\n".join(lines) + "\n"


def main(args: Any, argv: list[str]) -> int:
    """``python -m bench --nproc ...``: run the grid, write distributed.json and distributed.md into --out."""
    from tqdm import tqdm

    from .run import _csv, meta

    nprocs = [int(n) for n in _csv(args.nproc)]
    shardings = _csv(args.sharding)
    for s in shardings:
        if s not in SHARDINGS:
            raise SystemExit(f"--sharding: unknown {s!r}; choose from {', '.join(SHARDINGS)}")
    from .models import get_config

    models = _csv(args.models)
    modes = [m for m in _csv(args.modes) if m != "all"] or list(MODES)
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--nproc runs the modes {', '.join(MODES)}; got {m!r}")
    if "nondp" not in modes:
        modes.insert(0, "nondp")
    cases = [
        (model, b, mode, sh, n)
        for model in models
        for b in ([int(x) for x in _csv(args.batch_sizes)] or [get_config(model).default_batch])
        for sh in shardings
        for mode in modes
        for n in nprocs
    ]
    rows: list[dict[str, Any]] = []
    for model, b, mode, sh, n in tqdm(cases, desc="bench --nproc", unit="case", dynamic_ncols=True):
        spec = {
            "model": model, "batch": b, "mode": mode, "sharding": sh, "device": args.device, "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "seed": args.seed,
        }  # fmt: skip
        rows += launch(spec, n, args.timeout)
    summary = summarise(rows)
    info = meta(args, argv, rows)
    out = Path(args.out or REPO / "bench" / "results" / args.device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps({"meta": info, "summary": summary, "ranks": rows}, indent=1))
    md = markdown(info, summary, rows)
    (out / "distributed.md").write_text(md)
    print(md, flush=True)
    print(f"wrote {out / 'distributed.json'}, {out / 'distributed.md'}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rank-worker":
        result = run_rank(json.loads(sys.argv[2]))
        path = f"{sys.argv[3]}.{result['rank']}.json"
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
        sys.exit(0)
    print("usage: python -m bench --nproc 1,2 ... (this module's worker runs under torchrun)", file=sys.stderr)
    sys.exit(2)
