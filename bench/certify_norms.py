"""Cost and inflation of certified norms (dpkernels.ops.certified) against the raw reference norms.

    python -m bench.certify_norms [--repeat 5]

(a) time: per-sample squared norms of each layer, raw (dpkernels.ops.reference.*_norms, the plain
    float32 formulas) and certified (dpkernels.ops.certified.*, what the engine clips by), median of
    --repeat runs taken in turn, one thread;
(b) inflation: certified / exact - 1 per sample (exact: float64 per-sample gradients of the same float32
    tensors), max over the batch, and raw / exact - 1 for comparison.

Cases: a GPT-2-small block's Linear layers on random activations (T=256, d=768, p=3072, B=4: ghost
norms) and the demo CNN (dpkernels.demo.make_cnn) on a batch of scikit-learn digits with real output
gradients from its cross-entropy loss (the layers' inputs and output gradients recorded by hooks).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dpkernels import ops
from dpkernels.ops import reference as ref


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


def gpt2(repeat: int) -> list[str]:
    torch.manual_seed(0)
    B, T = 4, 256
    rows = []
    for name, d, p in (("attn c_attn 768->2304", 768, 2304), ("mlp c_fc 768->3072", 768, 3072),
                       ("mlp c_proj 3072->768", 3072, 768)):  # fmt: skip
        a, g = torch.randn(B, T, d), torch.randn(B, T, p) * 1e-3
        method = ops.linear_norm_method(T, d, p)
        exact = _exact_linear(a, g)
        rows.append(
            _row(
                f"GPT-2 {name} ({method})",
                lambda a=a, g=g, m=method: ref.linear_norms(a, g, bias=False, method=m),
                lambda a=a, g=g, m=method: ops.certified.linear_norms(a, g, bias=False, method=m, backend="reference"),
                exact,
                repeat,
            )
        )
    # a transformer-like input: a shared mean direction (tokens aligned) plus noise
    a = torch.randn(B, T, 768) * 0.3 + torch.randn(1, 1, 768)
    g = torch.randn(B, T, 3072) * 1e-3
    rows.append(
        _row(
            "GPT-2 mlp c_fc, aligned tokens (ghost)",
            lambda: ref.linear_norms(a, g, bias=False, method="ghost"),
            lambda: ops.certified.linear_norms(a, g, bias=False, method="ghost", backend="reference"),
            _exact_linear(a, g),
            repeat,
        )
    )
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| layer (method) | raw ms | certified ms | ratio | certified/exact - 1 (max) | |raw/exact - 1| (max) |")
    print("|---|---|---|---|---|---|")
    for row in gpt2(args.repeat) + cnn(args.repeat):
        print(row, flush=True)


if __name__ == "__main__":
    main()
