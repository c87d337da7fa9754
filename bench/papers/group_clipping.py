"""Group-wise clipping: all-layer, layer-wise, param-wise and user groupings on character-level transformers.

    python -m bench.papers.group_clipping            # the full run, minutes on a CPU core
    python -m bench.papers.group_clipping --quick    # a smoke run (CI), seconds

The claim (group-wise clipping papers): clipping each group of parameters (a layer, a block) to its
own bound costs accuracy against clipping the whole gradient to one bound (all-layer), the gap
shrinking as the model grows, while group-wise clipping needs less memory: a group's per-sample
gradient terms can be clipped and released as soon as its own backward is done, instead of being
held until the last layer's norm is known.

Set-up. Text that ships with Python: the docstrings (module, class, function; `ast.get_docstring`)
of the standard library's top-level modules, in sorted file-name order, read from disk (the
JSON records the Python version, the files and the corpus's SHA-256: another Python version reads
another text). Characters map to a fixed public alphabet (printable ASCII and newline; anything
else to '?'), so no vocabulary is learnt from the data. The text is cut into disjoint blocks of
T + 1 characters, one block per sample (the DP unit); every 10th block is held out for validation.

Models: GPT-like causal transformers (`bench.models.GPT`: token and position embeddings, pre-LN
blocks with written-out attention, final LayerNorm, untied head) of three sizes. Training: DP-Adam
(torch.optim.Adam under `make_private`), Abadi clipping with one total bound R split equally over
the G groups (R / sqrt(G) each: the same sensitivity R for every grouping), noise calibrated by the
accountant to the same epsilon for every run; the same lr and R for every grouping (no per-grouping
tuning). Reported: validation loss in bits per character and next-character accuracy, mean and
spread over seeds; and the exact peak tensor memory of one training step with book-keeping
(torch.profiler memory events on the CPU: the tensor bytes a step allocates above those live
before it), on a fixed batch of the expected batch size, next to the same step without DP.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import dpkernels
from bench.models import GPT
from dpkernels.data import poisson_loader
from dpkernels.demo import measure_peak_bytes

from ._common import DELTA, RESULTS, fmt, publish, pyplot, quiet_single_thread, spent_epsilon, spread

# ----------------------------------------------------------------------------- data

ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))  # fixed and public: 96 characters
UNKNOWN = ALPHABET.index("?")
HOLDOUT_EVERY = 10
LN2 = math.log(2.0)


def stdlib_docstrings(max_chars: int) -> tuple[str, dict[str, Any]]:
    """The first ``max_chars`` characters of the docstrings of the standard library's top-level modules.

    Files: ``<stdlib>/*.py`` in sorted name order; per file, every module, class and function
    docstring in `ast.walk` order, cleaned (`inspect.cleandoc`), joined by blank lines.
    Returns (text, provenance): the Python version, the files read and the SHA-256 of the text.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    files: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):  # a file this Python cannot parse (none in 3.11) is skipped
            continue
        nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [d for n in ast.walk(tree) if isinstance(n, nodes) and (d := ast.get_docstring(n, clean=True))]
        if not docs:
            continue
        files.append(path.name)
        parts.append("\n\n".join(docs))
        total += len(parts[-1]) + 2
        if total >= max_chars:
            break
    text = "\n\n".join(parts)[:max_chars]
    meta = {
        "python": sys.version.split()[0],
        "stdlib": str(root),
        "files": files,
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    return text, meta


def encode(text: str) -> Tensor:
    index = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([index.get(c, UNKNOWN) for c in text], dtype=torch.long)


def blocks(ids: Tensor, seq: int) -> tuple[Tensor, Tensor]:
    """Disjoint (T + 1)-character blocks split into (train, validation): every HOLDOUT_EVERY-th block is held out."""
    n = len(ids) // (seq + 1)
    b = ids[: n * (seq + 1)].view(n, seq + 1)
    held = torch.arange(n) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    return b[~held], b[held]


# ----------------------------------------------------------------------------- models and groupings


@dataclass(frozen=True)
class Size:
    d: int
    layers: int
    heads: int


SIZES = {"S": Size(16, 1, 2), "M": Size(32, 2, 2), "L": Size(48, 3, 4)}


def build(size: Size, seq: int) -> nn.Module:
    return GPT(len(ALPHABET), seq, size.d, size.layers, size.heads, tied=False, pos_ids="batch")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _per_block(name: str, module: nn.Module) -> str:
    """Embeddings, then each transformer block, then the final LayerNorm with the head."""
    if name in ("wte", "wpe"):
        return "embeddings"
    if name.startswith("blocks."):
        return "block " + name.split(".")[1]
    return "head"


def _embeddings_vs_rest(name: str, module: nn.Module) -> str:
    return "embeddings" if name in ("wte", "wpe") else "rest"


GROUPINGS: dict[str, str | Callable[[str, nn.Module], str]] = {
    "all-layer": "all-layer",
    "per-block": _per_block,
    "embeddings-vs-rest": _embeddings_vs_rest,
    "layer-wise": "layer-wise",
    "param-wise": "param-wise",
}


# ----------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Train:
    seq: int
    batch: int  # expected Poisson batch
    steps: int
    lr: float
    R: float
    epsilon: float


def lm_loss(model: nn.Module, b: Tensor) -> Tensor:
    """Mean next-character cross-entropy; every sample has T targets, so this is the mean of per-sample means."""
    logits = model(b[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, val: Tensor) -> tuple[float, float]:
    """(bits per character, next-character accuracy) on the held-out blocks."""
    model.eval()
    nll, hits, count = 0.0, 0, 0
    for b in val.split(512):
        logits = model(b[:, :-1])
        y = b[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        hits += int((logits.argmax(-1) == y).sum())
        count += y.numel()
    model.train()
    return nll / count / LN2, hits / count


def private(model: nn.Module, grouping: str, cfg: Train, n_train: int, sigma: float, seed: int):
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return dpkernels.make_private(
        model,
        opt,
        noise_multiplier=sigma,
        max_grad_norm=cfg.R,
        groups=GROUPINGS[grouping],
        sample_rate=cfg.batch / n_train,
        dataset_size=n_train,
        seed=seed,
    )


def train_once(
    train: Tensor, val: Tensor, size: Size, grouping: str | None, cfg: Train, sigma: float, seed: int
) -> dict[str, Any]:
    """One run (grouping None: without DP, on the same batches); validation bits/char and accuracy."""
    torch.manual_seed(seed)
    model = build(size, cfg.seq)
    n = len(train)
    q = cfg.batch / n
    if grouping is None:
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        dp = None
    else:
        model, dp = private(model, grouping, cfg, n, sigma, seed)
        opt = dp
    loader = poisson_loader(TensorDataset(train), q, steps=cfg.steps, generator=torch.Generator().manual_seed(seed))
    for (b,) in loader:
        if dp is not None:
            dp.backward(lm_loss(model, b))
        elif len(b):
            lm_loss(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    bpc, acc = evaluate(model, val)
    out: dict[str, Any] = {"bpc": bpc, "accuracy": acc}
    if dp is not None:
        out["epsilon"] = spent_epsilon(dp.accountant)
        out["groups"] = len(dp.engine.groups)
    return out


def peak_memory(train: Tensor, size: Size, grouping: str | None, cfg: Train, sigma: float) -> int:
    """Exact peak tensor bytes of one step on the first ``cfg.batch`` training blocks, after a warm-up step."""
    torch.manual_seed(0)
    model = build(size, cfg.seq)
    b = train[: cfg.batch]
    if grouping is None:
        opt: Any = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        model, opt = private(model, grouping, cfg, len(train), sigma, seed=0)

    def step() -> None:
        loss = lm_loss(model, b)
        if grouping is None:
            loss.backward()
        else:
            opt.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # Adam's state is allocated here, not in the measured step
    peak, _ = measure_peak_bytes(step, torch.device("cpu"))
    assert peak is not None
    return peak


# ----------------------------------------------------------------------------- the experiment


def _partial(out: Path, stem: str, size: str) -> Path:
    return out / f"{stem}.partial-{size}.json"


def run(args: argparse.Namespace, stem: str) -> dict[str, Any]:
    """Every size's runs. Each finished size is also written to ``<stem>.partial-<size>.json`` and, with
    --resume, a size whose partial file has this run's corpus and configuration is read back, not rerun
    (so sizes can run in separate processes and a killed run loses one size at most)."""
    text, corpus = stdlib_docstrings(args.corpus_chars)
    train, val = blocks(encode(text), args.seq)
    cfg = Train(seq=args.seq, batch=args.batch, steps=args.steps, lr=args.lr, R=args.R, epsilon=args.epsilon)
    q = cfg.batch / len(train)
    sigma = dpkernels.get_noise_multiplier(cfg.epsilon, DELTA, q, cfg.steps)
    res: dict[str, Any] = {
        "config": {**asdict(cfg), "seeds": args.seeds, "sizes": args.sizes, "groupings": args.groupings},
        "corpus": corpus,
        "n_train": len(train),
        "n_val": len(val),
        "sample_rate": q,
        "epochs": cfg.steps * q,
        "noise_multiplier": sigma,
        "sizes": {},
    }
    same = {"config": {k: v for k, v in res["config"].items() if k != "sizes"}, "corpus": corpus, "sigma": sigma}
    for s in args.sizes:
        part = _partial(args.out, stem, s)
        if args.resume and part.exists():
            saved = json.loads(part.read_text())
            if saved["same"] == json.loads(json.dumps(same)):
                res["sizes"][s] = saved["record"]
                continue
            print(f"  {part} is from another configuration: size {s} runs again", file=sys.stderr)
        size = SIZES[s]
        rec: dict[str, Any] = {"size": asdict(size), "params": n_params(build(size, cfg.seq)), "groupings": {}}
        t0 = time.perf_counter()
        for g in [None, *args.groupings]:
            name = g or "non-DP"
            seeds = range(args.seeds if g is not None else args.nondp_seeds)
            runs = [train_once(train, val, size, g, cfg, sigma, seed) for seed in seeds]
            entry: dict[str, Any] = {
                "runs": runs,
                "bpc": spread([r["bpc"] for r in runs]),
                "accuracy": spread([r["accuracy"] for r in runs]),
                "peak_bytes": peak_memory(train, size, g, cfg, sigma),
            }
            if g is not None:
                entry["groups"] = runs[0]["groups"]
                entry["epsilon"] = max(r["epsilon"] for r in runs)
            rec["groupings"][name] = entry
            if not args.quiet:
                print(
                    f"  {s} ({rec['params']} params) {name:19} bpc {fmt(entry['bpc'], 1, 3)}  "
                    f"acc {fmt(entry['accuracy'])}  peak {entry['peak_bytes'] / 2**20:.2f} MiB",
                    file=sys.stderr,
                )
        rec["seconds"] = time.perf_counter() - t0
        res["sizes"][s] = rec
        args.out.mkdir(parents=True, exist_ok=True)
        part.write_text(json.dumps({"same": same, "record": rec}, indent=1) + "\n")
    return res


def markdown(res: dict[str, Any]) -> str:
    cfg, c = res["config"], res["corpus"]
    eps = max(e["epsilon"] for r in res["sizes"].values() for k, e in r["groupings"].items() if k != "non-DP")
    lines = [
        "# Group-wise clipping on a character-level transformer",
        "",
        f"Corpus: {c['chars']} characters of standard-library docstrings (Python {c['python']}, "
        f"{len(c['files'])} files from {c['files'][0]} to {c['files'][-1]}, sha256 {c['sha256'][:16]}...); "
        f"{res['n_train']} training / {res['n_val']} validation blocks of T + 1 = {cfg['seq'] + 1} characters.",
        f"DP-Adam lr {cfg['lr']:g}, Abadi clipping, R_total {cfg['R']:g} split equally over the groups, "
        f"expected batch {cfg['batch']} (q = {res['sample_rate']:.4f}), {cfg['steps']} steps "
        f"({res['epochs']:.2f} epochs), noise multiplier {res['noise_multiplier']:.3f}, "
        f"epsilon spent (accountant, largest over runs) {eps:.3f} at delta {DELTA:g}.",
        "Validation bits per character (lower is better) and next-character accuracy: mean ± sample std "
        "over seeds (n runs). Peak memory: exact tensor bytes of one training step above those live "
        "before it (torch.profiler memory events), one fixed batch of the expected size.",
        "",
        "| size | params | grouping | groups | bits/char | accuracy (%) | gap to all-layer (bits/char) "
        "| peak step memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, rec in res["sizes"].items():
        base = rec["groupings"].get("all-layer")
        for name, e in rec["groupings"].items():
            gap = "" if base is None or name == "non-DP" else f"{e['bpc']['mean'] - base['bpc']['mean']:+.3f}"
            lines.append(
                f"| {s} (d={rec['size']['d']}, {rec['size']['layers']} layer(s)) | {rec['params']} | {name} | "
                f"{e.get('groups', '-')} | {fmt(e['bpc'], 1, 3)} | {fmt(e['accuracy'])} | {gap} | "
                f"{e['peak_bytes'] / 2**20:.2f} |"
            )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Three panels against model size: bits/char, the gap to all-layer, peak step memory; one line per grouping."""
    plt = pyplot()
    sizes = list(res["sizes"])
    params = [res["sizes"][s]["params"] for s in sizes]
    names = ["non-DP", *res["config"]["groupings"]]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, name in enumerate(names):
        es = [res["sizes"][s]["groupings"][name] for s in sizes]
        m = np.array([e["bpc"]["mean"] for e in es])
        sd = np.array([e["bpc"]["std"] for e in es])
        style = dict(color="k" if name == "non-DP" else f"C{i}", marker="o", label=name)
        ax[0].errorbar(params, m, yerr=sd, capsize=3, **style)
        if "all-layer" in names and name != "non-DP":
            base = np.array([res["sizes"][s]["groupings"]["all-layer"]["bpc"]["mean"] for s in sizes])
            ax[1].errorbar(params, m - base, yerr=sd, capsize=3, **style)
        ax[2].plot(params, [e["peak_bytes"] / 2**20 for e in es], **style)
    n = res["config"]["seeds"]
    ax[0].set(ylabel="validation bits / char", title=f"DP-Adam, epsilon {res['config']['epsilon']:g}, {n} seeds")
    ax[1].set(ylabel="bits / char minus all-layer's", title="gap to all-layer (error bar: the grouping's std)")
    ax[1].axhline(0, color="grey", lw=0.8)
    ax[2].set(ylabel="peak step memory (MiB)", yscale="log", title="exact peak tensor memory of a step (CPU)")
    for a in ax:
        a.set(xscale="log", xlabel="parameters")
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.papers.group_clipping", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: the smallest model, small corpus, 3 steps, 3 seeds"
    )
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    p.add_argument("--groupings", nargs="+", choices=list(GROUPINGS), default=list(GROUPINGS))
    p.add_argument("--corpus-chars", type=int, default=300_000)
    p.add_argument("--seq", type=int, default=32, help="T: characters of context per sample")
    p.add_argument("--batch", type=int, default=64, help="expected Poisson batch size")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--R", type=float, default=1.0, help="total clipping bound, split equally over the groups")
    p.add_argument("--epsilon", type=float, default=3.0, help=f"target epsilon at delta={DELTA:g}")
    p.add_argument("--seeds", type=int, default=3, help="DP runs per point (seeds 0..k-1)")
    p.add_argument("--nondp-seeds", type=int, default=1, help="runs of the non-DP reference per size")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--resume", action="store_true", help="read back sizes already written by a run of this config")
    a = p.parse_args(argv)
    if a.quick:
        a.corpus_chars, a.steps, a.batch, a.seeds, a.sizes = 20_000, 3, 16, 3, ["S"]
    if a.seeds < 1 or a.nondp_seeds < 1:
        p.error("--seeds and --nondp-seeds must be >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stem = "group_clipping_quick" if args.quick else "group_clipping"
    with quiet_single_thread():
        res = run(args, stem)
    return publish(args.out, stem, res, markdown(res), plot)


if __name__ == "__main__":
    sys.exit(main())
