"""Certified norms of the Triton backend's Embedding and Conv layers: the generic certificate against the
kernels' own bounds, on natural data.

    TRITON_INTERPRET=1 PYTHONPATH=. python -m bench.certify_norms_triton [--repeat 5]

For each layer, with the Triton backend (dpkernels.ops.certified.*_bound, backend="triton"):
(a) inflation: certified / exact - 1, max over the batch (exact: the reference's norm of the same stored
    tensors in float64), and |raw / exact - 1| of the Triton kernel's float32 norm for comparison;
(b) work: Triton launches and kernel-like aten ops (bench.counters) of the certified call (the op's input
    checks included; generic: the raw kernel's too), and of the raw kernel alone;
(c) time of the host-side (reference) work of the generic certificate only: the raw kernel's result is
    precomputed, so the interpreter's kernel time is not counted (median of --repeat, one thread);
(d) the largest temporary the generic certificate makes (the conv's unfolded rows).

"generic" forces the generic certificate (dpkernels.ops.bounds.generic_bound around the raw norm);
"own" is what dpkernels.ops.certified serves for the Triton backend (the kernels' own bounds where the
backend has them; the same as generic otherwise).

Cases: GPT-2's token table wte (V = 50257, D = 768) on Zipf-distributed ids (natural text repeats its
frequent tokens), its position table wpe (V = 1024: every id once), and convs: the demo CNN's two
Conv2d layers on scikit-learn digits with real output gradients, a ResNet-like 3x3 64->64 at 16x16.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from bench.counters import StepCounter, count_triton_launches
from dpkernels import ops
from dpkernels.ops import certified
from dpkernels.ops import reference as ref
from dpkernels.ops import triton as tt
from dpkernels.ops.bounds import Bound


@contextlib.contextmanager
def _generic(raw_result):
    """dpkernels.ops.certified with no backend bound (the generic certificate) and the raw op replaced by
    its precomputed result: what remains is the certificate's own work."""
    load, resolve = certified._load, certified.resolve_named
    certified._load = lambda name: types.SimpleNamespace()
    certified.resolve_named = lambda op, t, backend=None: ((lambda *a, **k: raw_result), "triton")
    try:
        yield
    finally:
        certified._load, certified.resolve_named = load, resolve


def _median_time(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _counts(fn) -> tuple[int, int]:
    """(Triton launches, kernel-like aten ops) of one call."""
    with count_triton_launches() as launches, StepCounter() as c:
        fn()
    return sum(launches.values()), sum(c.kernels.values())


def _first(x):
    """The weight's part of a (weight, bias) pair (a Bound is a tuple too)."""
    return x[0] if isinstance(x, tuple) and not isinstance(x, Bound) else x


def _measure(name, raw, bound, exact, repeat, temp_bytes=0) -> list[str]:
    """Rows for the generic certificate and the one served."""
    raw_v = _first(raw())
    raw_err = float((raw_v.double() / exact - 1).abs().max())
    n_raw = _counts(raw)
    rows = []
    with _generic(raw()):
        gen = _first(bound()).certified()
        t_gen = _median_time(bound, repeat)
        n_gen = _counts(bound)
    own = _first(bound()).certified()
    n_own = _counts(bound)
    assert bool((gen >= exact).all()) and bool((own >= exact).all()), name
    rows.append(f"| {name} | raw kernel alone | - | {raw_err:.1e} | {n_raw[0]} | {n_raw[1]} | - | - |")
    n_gen = (n_gen[0] + n_raw[0], n_gen[1] + n_raw[1])  # the certificate runs on the raw kernel's result
    for kind, c, n, t in (("generic", gen, n_gen, f"{t_gen * 1e3:.2f}"), ("own", own, n_own, "-")):
        infl = float((c / exact - 1).max())
        mem = f"{temp_bytes / 2**20:.1f}" if kind == "generic" and temp_bytes else "-"
        rows.append(f"| {name} | {kind} | {infl:.2e} | {raw_err:.1e} | {n[0]} | {n[1]} | {t} | {mem} |")
    return rows


def _zipf_ids(B: int, T: int, V: int, gen: torch.Generator) -> torch.Tensor:
    p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)
    return torch.multinomial(p.expand(B, V), T, replacement=True, generator=gen)


def embedding(repeat: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, V, B, T, ids_fn in (
        ("GPT-2 wte, Zipf ids", 50257, 2, 256, lambda B, T, V: _zipf_ids(B, T, V, gen)),
        ("GPT-2 wte, Zipf ids", 50257, 2, 1024, lambda B, T, V: _zipf_ids(B, T, V, gen)),
        ("GPT-2 wpe, ids 0..T-1", 1024, 2, 64, lambda B, T, V: torch.arange(T).expand(B, T)),
        ("GPT-2 wpe, ids 0..T-1", 1024, 2, 1024, lambda B, T, V: torch.arange(T).expand(B, T)),
    ):
        ids = ids_fn(B, T, V).contiguous()
        g = torch.randn(B, T, 768, generator=gen) * 1e-3
        exact = ref.embedding_norms(ids, g.double(), num_embeddings=V, padding_idx=None)
        distinct = float(torch.tensor([len(set(r.tolist())) for r in ids]).double().mean())
        rows += _measure(
            f"{name} V={V} T={T} ({distinct:.0f} distinct)",
            lambda ids=ids, g=g, V=V: tt.embedding_norms(ids, g, num_embeddings=V, padding_idx=None),
            lambda ids=ids, g=g, V=V: certified.embedding_norms_bound(
                ids, g, num_embeddings=V, padding_idx=None, backend="triton"
            ),
            exact,
            repeat,
        )
    return rows


def _conv_case(name, x, g, geom, repeat) -> list[str]:
    T = g[0, 0].numel()
    d = x.shape[1] // geom["groups"] * int(torch.tensor(geom["kernel_size"]).prod())
    method = ops.linear_norm_method(T, d, g.shape[1] // geom["groups"])
    exact = ref.conv_norms(x.double(), g.double(), **geom, bias=False, method="inst")[0]
    a, _ = ref.conv_rows(x, g, **geom)
    return _measure(
        f"{name} ({method})",
        lambda: tt.conv_norms(x, g, **geom, bias=False, method=method),
        lambda: certified.conv_norms_bound(x, g, **geom, bias=False, method=method, backend="triton"),
        exact,
        repeat,
        a.numel() * a.element_size(),
    )


def conv(repeat: int) -> list[str]:
    from dpkernels.demo import load_digits_split, make_cnn

    torch.manual_seed(0)
    train, _, _ = load_digits_split()
    x, y = train.tensors[0][:8], train.tensors[1][:8]
    model = make_cnn()
    saved: dict[nn.Module, list] = {}
    for m in model:
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: saved.__setitem__(mod, [inp[0].detach()]))
            m.register_full_backward_hook(lambda mod, gi, go: saved[mod].append(go[0].detach()) and None)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    rows = []
    for i, m in enumerate(model):
        if m in saved:
            xin, g = saved[m]
            geom = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=1)
            rows += _conv_case(f"CNN {i} Conv2d {tuple(m.weight.shape)} B=8", xin, g, geom, repeat)
    gen = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(2, 64, 16, 16, generator=gen))
    g = torch.randn(2, 64, 16, 16, generator=gen) * 1e-3
    geom = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    rows += _conv_case("ResNet-like Conv2d 64->64 3x3 16x16 B=2", x, g, geom, repeat)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    print(
        "| layer | certificate | certified/exact - 1 (max) | |raw/exact - 1| (max) | Triton launches "
        "| kernel-like aten ops | host ms beside the raw kernel | largest temporary MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for rows in (embedding, conv):
        for row in rows(args.repeat):
            print(row, flush=True)


if __name__ == "__main__":
    main()
