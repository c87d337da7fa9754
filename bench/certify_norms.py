"""Cost and inflation of certified norms (dpkernels.ops.certified) against the raw reference norms.

    python -m bench.certify_norms [--repeat 5] [--head]
    python -m bench.certify_norms --step [--repeat 5] [--cases gpt2-tiny:4,gpt2-small:2,...]

(a) time: per-sample squared norms of each layer, raw (dpkernels.ops.reference.*_norms, the plain
    float32 formulas) and certified (dpkernels.ops.certified.*, what the engine clips by), median of
    --repeat runs taken in turn, one thread;
(b) inflation: certified / exact - 1 per sample (exact: float64 per-sample gradients of the same float32
    tensors), max over the batch, and raw / exact - 1 for comparison.

--step: (c) the whole DP step (bench.modes "dpk-bk:reference": forward, the engine's backward with norms,
clip factors, clipped sums and noise, optimizer step) with the certified norms against the same step
with the raw float32 norms (`raw_norms`: a benchmark-only patch of dpkernels.ops.certified, never a
user-reachable switch), timed in turn, median of --repeat, one thread; and the kernel-like aten ops of
one step of each (bench.counters.StepCounter). A third variant, timed in turn with the two, forms the
ghost bounds' Grams from scaled copies of the rows (`scaled_copies`: the route of other devices, and of
an operand with a zero, tiny or huge sample, instead of the CPU's unscaled one).

Cases: a GPT-2-small block's Linear layers on random activations (T=256, d=768, p=3072, B=4: ghost
norms) and the demo CNN (dpkernels.demo.make_cnn) on a batch of scikit-learn digits with real output
gradients from its cross-entropy loss (the layers' inputs and output gradients recorded by hooks).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dpkernels import ops
from dpkernels.ops import reference as ref
from dpkernels.ops.bounds import F64, Bound


def _time(fns, repeat: int) -> list[float]:
    """Median time of each of ``fns``, run in turn within each repetition: a change in the machine's load
    during the run moves them alike, not one of them."""
    for fn in fns:
        fn()
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in ts]


def _exact_linear(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.einsum("btp,btd->bpd", g.double(), a.double()).square().sum(dim=(1, 2))


def _row(name: str, raw, cert, exact, repeat: int) -> str:
    t_raw, t_cert = _time([raw, cert], repeat)
    r, c = raw(), cert()
    r = r[0] if isinstance(r, tuple) else r
    c = c[0] if isinstance(c, tuple) else c
    infl = float((c / exact - 1).max())
    raw_err = float((r.double() / exact - 1).abs().max())
    return f"| {name} | {t_raw * 1e3:.2f} | {t_cert * 1e3:.2f} | {t_cert / t_raw:.2f}x | {infl:.2e} | {raw_err:.2e} |"


def _linear_row(name: str, a: torch.Tensor, g: torch.Tensor, method: str, repeat: int) -> str:
    """A bias-free Linear's raw and certified reference norms of (a, g) by ``method``, against the exact ones."""
    return _row(
        f"{name} ({method})",
        lambda: ref.linear_norms(a, g, bias=False, method=method),
        lambda: ops.certified.linear_norms(a, g, bias=False, method=method, backend="reference"),
        _exact_linear(a, g),
        repeat,
    )


def gpt2(repeat: int, head: bool = False) -> list[str]:
    torch.manual_seed(0)
    B, T = 4, 256
    rows = []
    for name, d, p in (("attn c_attn 768->2304", 768, 2304), ("mlp c_fc 768->3072", 768, 3072),
                       ("mlp c_proj 3072->768", 3072, 768)):  # fmt: skip
        a, g = torch.randn(B, T, d), torch.randn(B, T, p) * 1e-3
        rows.append(_linear_row(f"GPT-2 {name}", a, g, ops.linear_norm_method(T, d, p), repeat))
    if head:  # the LM head: p = 50257 (B = 2: its float64 exact norms take 0.6 GB)
        a, g = torch.randn(2, T, 768), torch.randn(2, T, 50257) * 1e-4
        rows.append(_linear_row("GPT-2 lm_head 768->50257, B=2", a, g, "ghost", repeat))
    # a transformer-like input: a shared mean direction (tokens aligned) plus noise
    a = torch.randn(B, T, 768) * 0.3 + torch.randn(1, 1, 768)
    g = torch.randn(B, T, 3072) * 1e-3
    rows.append(_linear_row("GPT-2 mlp c_fc, aligned tokens", a, g, "ghost", repeat))
    return rows


def cnn(repeat: int) -> list[str]:
    from dpkernels.demo import load_digits_split, make_cnn

    torch.manual_seed(0)
    train, _, _ = load_digits_split()
    x, y = train.tensors[0][:256], train.tensors[1][:256]
    model = make_cnn()
    saved: dict[nn.Module, list] = {}
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm)):
            m.register_forward_hook(lambda mod, inp, out: saved.__setitem__(mod, [inp[0].detach()]))
            m.register_full_backward_hook(lambda mod, gi, go: saved[mod].append(go[0].detach()) and None)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    rows = []
    for i, m in enumerate(model):
        if m not in saved:
            continue
        xin, g = saved[m]
        if isinstance(m, nn.Conv2d):
            geom = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=1)
            T = g.shape[2] * g.shape[3]
            method = ops.linear_norm_method(T, m.weight[0].numel(), m.out_channels)
            ex = []
            for j in range(x.shape[0]):
                w = m.weight.detach().double().requires_grad_()
                out = F.conv2d(xin[j : j + 1].double(), w, None, m.stride, m.padding)
                ex.append(torch.autograd.grad((out * g[j : j + 1].double()).sum(), w)[0].square().sum())
            rows.append(
                _row(
                    f"CNN {i} Conv2d {tuple(m.weight.shape)} ({method})",
                    lambda xin=xin, g=g, geom=geom, mt=method: ref.conv_norms(xin, g, **geom, bias=True, method=mt),
                    lambda xin=xin, g=g, geom=geom, mt=method: ops.certified.conv_norms(
                        xin, g, **geom, bias=True, method=mt, backend="reference"
                    ),
                    torch.stack(ex),
                    repeat,
                )
            )
        elif isinstance(m, nn.Linear):
            a, gg = xin[:, None], g[:, None]
            method = ops.linear_norm_method(1, a.shape[-1], gg.shape[-1])
            rows.append(
                _row(
                    f"CNN {i} Linear ({method})",
                    lambda a=a, gg=gg, mt=method: ref.linear_norms(a, gg, bias=True, method=mt),
                    lambda a=a, gg=gg, mt=method: ops.certified.linear_norms(
                        a, gg, bias=True, method=mt, backend="reference"
                    ),
                    _exact_linear(a, gg),
                    repeat,
                )
            )
        else:
            xh = F.group_norm(xin, m.num_groups, eps=m.eps).flatten(2).transpose(1, 2)
            gr = g.flatten(2).transpose(1, 2)
            rows.append(
                _row(
                    f"CNN {i} GroupNorm affine weight",
                    lambda xh=xh, gr=gr: ref.affine_norms(xh, gr, weight=True, bias=True),
                    lambda xh=xh, gr=gr: ops.certified.affine_norms(
                        xh, gr, weight=True, bias=True, backend="reference"
                    ),
                    (xh.double() * gr.double()).sum(1).square().sum(1),
                    repeat,
                )
            )
    return rows


@contextlib.contextmanager
def raw_norms() -> Iterator[None]:
    """Within the block the engine clips by the raw norms (the backend's float32 formulas, taken to
    float64 as the certified ones are), not certified ones: the baseline that shows what certification
    costs a step. Benchmark only: it patches dpkernels.ops.certified, which the layers call by attribute."""
    cert = ops.certified

    def pair(w, b):
        return w.to(F64), None if b is None else b.to(F64)

    def as_bound(n: torch.Tensor) -> Bound:
        z = n.to(F64)
        return Bound(z, torch.zeros_like(z), torch.full_like(z, float("inf")))

    def lin_bound(a, g, *, bias, method, backend=None):
        w, b = ops.linear_norms(a, g, bias=bias, method=method, backend=backend)
        return as_bound(w), None if b is None else as_bound(b)

    def emb_bound(ids, g, *, num_embeddings, padding_idx, backend=None):
        return as_bound(
            ops.embedding_norms(ids, g, num_embeddings=num_embeddings, padding_idx=padding_idx, backend=backend)
        )

    def cross_bound(ids, g_e, a, g_h, *, padding_idx, backend=None):
        return as_bound(ops.embedding_linear_cross(ids, g_e, a, g_h, padding_idx=padding_idx, backend=backend))

    patches = {
        "linear_norms": lambda *a, **k: pair(*ops.linear_norms(*a, **k)),
        "conv_norms": lambda *a, **k: pair(*ops.conv_norms(*a, **k)),
        "affine_norms": lambda *a, **k: tuple(None if n is None else n.to(F64) for n in ops.affine_norms(*a, **k)),
        "bias_norms": lambda *a, **k: ops.bias_norms(*a, **k).to(F64),
        "embedding_norms": lambda *a, **k: ops.embedding_norms(*a, **k).to(F64),
        "linear_norms_bound": lin_bound,
        "embedding_norms_bound": emb_bound,
        "embedding_linear_cross_bound": cross_bound,
    }
    saved = {k: getattr(cert, k) for k in patches}
    try:
        for k, fn in patches.items():
            setattr(cert, k, fn)
        yield
    finally:
        for k, fn in saved.items():
            setattr(cert, k, fn)


@contextlib.contextmanager
def scaled_copies() -> Iterator[None]:
    """Within the block the reference ghost bounds form every Gram from the scaled copies of the rows
    (the route `_unscaled_ok` spares in-range float32 rows on the CPU): its cost, measured in turn with
    the others."""
    from dpkernels.ops.reference import bounds as rb

    saved = rb._unscaled_ok
    rb._unscaled_ok = lambda xs, s, dt: [False] * len(xs)
    try:
        yield
    finally:
        rb._unscaled_ok = saved


STEP_CASES = "gpt2-tiny:4,gpt2-tiny:16,gpt2-small:2,gpt2-small:4,resnet18-gn-tiny:8,resnet18-gn-tiny:32"


def _step_fn(work, runner):
    def one() -> None:
        runner.optimizer.zero_grad(set_to_none=True)
        runner.backward(work.loss(runner.model(work.x), runner.criterion))
        runner.optimizer.step()

    return one


def step(cases: str, repeat: int) -> list[str]:
    """Whole-step time and kernel-like op count, certified vs raw norms (dpk-bk:reference)."""
    from . import modes
    from .counters import StepCounter
    from .models import build

    rows = []
    for case in cases.split(","):
        name, _, batch = case.partition(":")
        B = int(batch)
        work = build(name, B, "cpu", seed=0)
        runner = modes.setup("dpk-bk:reference", work, modes.Context(device="cpu", batch=B))
        one = _step_fn(work, runner)

        def raw(one=one) -> None:
            with raw_norms():
                one()

        def scaled(one=one) -> None:
            with scaled_copies():
                one()

        counts = []
        for fn in (raw, one):
            c = StepCounter()
            fn()
            with c:
                fn()
            counts.append(sum(c.kernels.values()))
        t_raw, t_cert, t_sc = _time([raw, one, scaled], repeat)
        rows.append(
            f"| {name} | {B} | {t_raw * 1e3:.1f} | {t_cert * 1e3:.1f} | {t_cert / t_raw:.3f}x | "
            f"{t_sc * 1e3:.1f} | {t_sc / t_raw:.3f}x | {counts[0]} | {counts[1]} | {counts[1] - counts[0]:+d} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--head", action="store_true", help="add GPT-2's LM head (p = 50257) to the layer table")
    ap.add_argument("--step", action="store_true", help="whole DP steps, certified vs raw norms")
    ap.add_argument("--cases", default=STEP_CASES, help="model:batch,... for --step (bench.models names)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.step:
        print(
            "| model | B | raw-norm step ms | certified step ms | ratio | certified, scaled copies ms | ratio | "
            "kernel-like ops raw | certified | extra |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        step(args.cases, args.repeat)
        return
    print("| layer (method) | raw ms | certified ms | ratio | certified/exact - 1 (max) | |raw/exact - 1| (max) |")
    print("|---|---|---|---|---|---|")
    for row in gpt2(args.repeat, args.head) + cnn(args.repeat):
        print(row, flush=True)


if __name__ == "__main__":
    main()
