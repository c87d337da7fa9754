"""One-run privacy auditing: an empirical lower bound on the epsilon a training run spends.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023). m canaries
are each put into the training set independently with probability 1/2 (S_j = +1 in, -1 out); after
training the auditor scores every canary, guesses "in" for the k+ highest scores and "out" for the k-
lowest (abstaining on the rest), and counts its correct guesses v out of r = k+ + k-. If training is
(epsilon, delta)-DP, v is not much more likely to be large than the number of heads in r coins of bias
e^eps / (1 + e^eps) (`p_value`); a v too large for that rejects the claim, and the largest epsilon so
rejected is the lower bound (`epsilon_lower_bound`). The same theorem applied along the privacy
profile of mu-Gaussian DP gives a lower bound on mu, converted to epsilon at the given delta
(`gdp_mu_lower_bound`, `gdp_epsilon`).

Canaries (`run_audit`), both trained through `make_private`'s real clipping and noise:

- input-space canaries: images of uniform noise with random labels, added to the data; score = the
  growth of the logit margin of the canary's label over training (a black-box score).
- gradient canaries: rows of the batch whose per-sample gradient is c * e_j, c >= R, on an extra
  bias-free DPLinear(m, 1) fed c * e_j (the one-hot of canary j) and added to the loss; they have no
  gradient on the model. Score = sum over steps of coordinate j of that layer's noised gradient
  (white-box: what DP-SGD's accounting covers, every step's noised gradient, is released).

    python -m dpkernels.audit --model cnn          # the demo's CNN on digits at epsilon = 3
    python -m dpkernels.audit --model transformer  # a one-block transformer on digits' rows
"""

from __future__ import annotations

import argparse
import logging
import math
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize, special, stats
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import dpkernels
from dpkernels.data import poisson_loader

# ---------------------------------------------------------------------------------------------- bounds


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct (v={v}) <= guesses (r={r}) <= canaries (m={m})")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Probability of v or more correct guesses out of r, over m canaries, if training is (epsilon, delta)-DP.

    Steinke, Nasr & Jagielski 2023, Theorem 3: with W ~ Binomial(r, p), p = e^eps / (e^eps + 1),

        P[correct >= v] <= P[W >= v] + 2 m delta * max_{i = 1..v} P[v - i <= W < v] / i

    (for i > v the window is P[W < v] / i, which only decreases, so i <= v suffices).
    """
    _check_counts(m, r, v)
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got epsilon={epsilon}, delta={delta}")
    if v == 0:
        return 1.0
    p = float(special.expit(epsilon))
    tail = float(special.bdtrc(v - 1, r, p))  # P[W >= v] = P[W > v - 1]
    if delta == 0:
        return min(tail, 1.0)
    # P[W = j] for j = v-1, v-2, ..., 0 in logs (log p and log(1 - p) exact for any epsilon >= 0).
    j = np.arange(v - 1, -1, -1, dtype=np.float64)
    log_p, log_q = -np.logaddexp(0.0, -epsilon), -np.logaddexp(0.0, epsilon)
    log_pmf = special.gammaln(r + 1) - special.gammaln(j + 1) - special.gammaln(r - j + 1) + j * log_p
    window = np.cumsum(np.exp(log_pmf + (r - j) * log_q))  # window[i-1] = P[v-i <= W < v]
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, beta: float = 0.05, delta: float = 0.0) -> float:
    """The largest epsilon (to 1e-6) whose (epsilon, delta)-DP claim v correct guesses of r reject at level beta.

    Returned is an epsilon at which `p_value` <= beta was evaluated (0 if none): training is then not
    (epsilon', delta)-DP for any epsilon' <= it, with confidence 1 - beta (a smaller epsilon' would
    imply the rejected claim).
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= beta:  # ends: p -> 1 as epsilon grows (expit rounds to 1 by ~37)
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of mu-Gaussian DP (Dong, Roth & Su 2022, Corollary 2.13):

    delta = Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2).
    """
    if mu <= 0:
        return 0.0
    a = stats.norm.cdf(-epsilon / mu + mu / 2)
    b = math.exp(epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2))  # e^eps Phi(.) without overflow
    return float(max(a - b, 0.0))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon at which mu-Gaussian DP has the given delta (0 if delta(0) <= delta already)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(mu, hi) > delta:
        hi *= 2
    return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=1e-9))


def gdp_p_value(m: int, r: int, v: int, mu: float) -> float:
    """Probability of v or more correct guesses out of r if training is mu-Gaussian DP.

    mu-GDP implies (eps, delta_mu(eps))-DP for every eps >= 0 at once (`gdp_delta`), so each eps gives
    a valid bound by `p_value`'s theorem, and so does their minimum:

        P[correct >= v] <= min_eps [ P[W_eps >= v] + 2 m delta_mu(eps) max_i P[v - i <= W_eps < v] / i ]

    The minimum is searched on a grid and refined (any eps evaluated gives a valid bound).
    """
    _check_counts(m, r, v)
    if v == 0:
        return 1.0

    def bound(e: float) -> float:
        return p_value(m, r, v, e, gdp_delta(mu, e))

    # Beyond the eps where P[W >= v] alone passes 1/2 the bound is > 1/2, of no use at any beta < 1/2.
    top = 1.0
    while p_value(m, r, v, top) < 0.5:
        top *= 2
    grid = np.linspace(0.0, top, 33)
    values = [bound(float(e)) for e in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    refined = optimize.minimize_scalar(bound, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(min(min(values), float(refined.fun)))


def gdp_mu_lower_bound(m: int, r: int, v: int, *, beta: float = 0.05) -> float:
    """The largest mu (to 1e-3) whose mu-GDP claim v correct guesses of r reject at level beta (0 if none).

    mu-GDP is rejected when `p_value` at some (eps, delta_mu(eps)) is <= beta (`gdp_p_value`'s bound).
    That only grows with mu (delta_mu(eps) does for every eps); the returned mu is one at which such an
    eps was found, so training is not mu'-GDP for any mu' <= it.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta}")
    _check_counts(m, r, v)
    # Only eps where P[W >= v] alone is <= beta can reject: [0, the delta = 0 bound].
    top = epsilon_lower_bound(m, r, v, beta=beta)
    if top == 0.0:
        return 0.0
    grid = np.linspace(0.0, top, 33)

    def rejects(mu: float) -> bool:
        values = []
        for e in grid:
            values.append(p_value(m, r, v, float(e), gdp_delta(mu, float(e))))
            if values[-1] <= beta:
                return True
        i = int(np.argmin(values))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        res = optimize.minimize_scalar(
            lambda e: p_value(m, r, v, e, gdp_delta(mu, e)), bounds=(lo, hi), method="bounded", options={"xatol": 1e-4}
        )
        return float(res.fun) <= beta

    lo, hi = 0.0, 1.0
    while rejects(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        if rejects(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------------- guesses


@dataclass
class Guess:
    """One way of guessing: the k_plus highest scores "in", the k_minus lowest "out"."""

    k_plus: int
    k_minus: int
    correct: int = 0
    epsilon: float = 0.0  # the (epsilon, delta) lower bound from these guesses
    mu: float = 0.0  # the mu-GDP lower bound
    epsilon_gdp: float = 0.0  # mu converted to epsilon at delta

    @property
    def guesses(self) -> int:
        return self.k_plus + self.k_minus


@dataclass
class AuditResult:
    """The bounds from one set of canary scores. Each bound holds with confidence 1 - beta."""

    m: int
    included: int
    beta: float
    delta: float
    guesses: list[Guess]
    in_scores: np.ndarray
    out_scores: np.ndarray

    @property
    def best(self) -> Guess:
        return max(self.guesses, key=lambda g: g.epsilon)

    @property
    def epsilon(self) -> float:
        """Training is not (epsilon, delta)-DP for any epsilon <= this (confidence 1 - beta)."""
        return max(g.epsilon for g in self.guesses)

    @property
    def mu(self) -> float:
        """Training is not mu-GDP for any mu <= this (confidence 1 - beta)."""
        return max(g.mu for g in self.guesses)

    @property
    def epsilon_gdp(self) -> float:
        """`mu` as epsilon at delta: no run that is as private as a Gaussian mechanism with this (eps, delta)."""
        return max(g.epsilon_gdp for g in self.guesses)


DEFAULT_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5)


def default_guesses(m: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[tuple[int, int]]:
    """For k = round(f * m / 2), each fraction f: (k, k), and (k, 0), guessing "in" only.

    "In"-only guesses matter under Poisson sampling: an included canary that no batch happened to hold
    scores like an excluded one, so the lowest scores are never free of included canaries.
    """
    ks = sorted({max(1, round(f * m / 2)) for f in fractions})
    return [(k, k) for k in ks if 2 * k <= m] + [(k, 0) for k in ks]


def count_correct(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> int:
    """Correct guesses when the k_plus highest scores are guessed "in" and the k_minus lowest "out"."""
    m = len(scores)
    if k_plus + k_minus > m:
        raise ValueError(f"k_plus + k_minus = {k_plus + k_minus} guesses for {m} canaries")
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[:k_plus], order[m - k_minus :]
    return int(included[top].sum() + (~included[bottom]).sum())


def audit_scores(
    scores: np.ndarray | Tensor,
    included: np.ndarray | Tensor,
    *,
    beta: float = 0.05,
    delta: float = 1e-5,
    guesses: Sequence[tuple[int, int]] | None = None,
    gdp: bool = True,
) -> AuditResult:
    """Lower bounds from canary scores (higher = more likely in) and the truth of which were in.

    Each of the (k+, k-) ``guesses`` (default `default_guesses`) is tested at level beta / len(guesses)
    (Bonferroni), so the best of them holds at confidence 1 - beta although it was chosen after seeing
    the scores. ``gdp``: also the mu-GDP bound (a few seconds for ~1000 canaries).
    """
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64)
    inc = np.asarray(included.detach().cpu() if isinstance(included, Tensor) else included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and included {inc.shape} must be two vectors of one length")
    if not np.isfinite(s).all():
        raise ValueError("canary scores must be finite (a NaN would be ranked arbitrarily)")
    m = len(s)
    pairs = list(guesses) if guesses is not None else default_guesses(m)
    if not pairs:
        raise ValueError(f"no guesses to test with {m} canaries")
    level = beta / len(pairs)
    out = []
    for kp, km in pairs:
        g = Guess(kp, km, count_correct(s, inc, kp, km))
        g.epsilon = epsilon_lower_bound(m, g.guesses, g.correct, beta=level, delta=delta)
        if gdp:
            g.mu = gdp_mu_lower_bound(m, g.guesses, g.correct, beta=level)
            g.epsilon_gdp = gdp_epsilon(g.mu, delta) if g.mu > 0 else 0.0
        out.append(g)
    return AuditResult(m, int(inc.sum()), beta, delta, out, s[inc], s[~inc])


# ---------------------------------------------------------------------------------------------- models


def make_transformer(dim: int = 32, heads: int = 4, blocks: int = 1, num_classes: int = 10) -> nn.Module:
    """(B, 1, 8, 8) digits -> logits: the 8 rows as tokens, pre-norm transformer block(s), mean-pool, Linear."""
    return _Transformer(dim, heads, blocks, num_classes)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: Tensor) -> Tensor:
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


class _Transformer(nn.Module):
    def __init__(self, dim: int, heads: int, blocks: int, num_classes: int, tokens: int = 8, width: int = 8):
        super().__init__()
        self.tokens, self.width = tokens, width
        self.embed = nn.Linear(width, dim)
        self.pos = nn.Embedding(tokens, dim)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        positions = torch.arange(self.tokens, device=x.device).expand(B, self.tokens)
        h = self.embed(x.reshape(B, self.tokens, self.width)) + self.pos(positions)
        return self.head(self.norm(self.blocks(h)).mean(dim=1))


def make_model(name: str) -> nn.Module:
    from dpkernels.demo import make_cnn

    if name == "cnn":
        return make_cnn()
    if name == "transformer":
        return make_transformer()
    raise ValueError(f"model must be 'cnn' or 'transformer', got {name!r}")


# ---------------------------------------------------------------------------------------------- the run


class CanaryModel(nn.Module):
    """The audited ``model`` next to a bias-free Linear(m, 1) that carries the gradient canaries.

    forward(x, taps) = (model(x), canaries(taps)[:, 0]). A gradient canary's row has ``taps`` = c e_j
    and its loss is its tap output, so its per-sample gradient is c e_j on ``canaries.weight`` and
    exactly zero on the model; every other row has taps = 0 and no gradient on ``canaries``.
    """

    def __init__(self, model: nn.Module, gradient_canaries: int):
        super().__init__()
        self.model = model
        self.canaries = nn.Linear(max(gradient_canaries, 1), 1, bias=False)
        nn.init.zeros_(self.canaries.weight)

    def forward(self, x: Tensor, taps: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(x), self.canaries(taps)[:, 0]


@dataclass
class AuditConfig:
    """One audited training run. The defaults are the demo's DP-SGD (epsilon 3 at delta 1e-5, 10 epochs)."""

    model: str = "cnn"
    epochs: float = 10.0
    epsilon: float = 3.0
    delta: float = 1e-5
    batch_size: int = 256  # expected Poisson batch
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"
    lr: float = 0.1
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    input_canaries: int = 500
    gradient_canaries: int = 1000
    canary_norm: float = 100.0  # a gradient canary's gradient norm, in units of max_grad_norm (>= 1)
    beta: float = 0.05
    seed: int | None = 0  # None: inclusion, batches and noise from the OS's entropy


@dataclass
class RunAudit:
    """What `run_audit` measured."""

    config: AuditConfig
    claimed_epsilon: float  # the accountant's, for the steps taken
    noise_multiplier: float
    sample_rate: float
    dataset_size: int  # real examples + included canaries
    steps: int
    accuracy: float
    seconds: float
    input: AuditResult | None = None
    gradient: AuditResult | None = None
    notes: list[str] = field(default_factory=list)


def _logit_margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{c != y} z_c per row."""
    was = model.training
    model.eval()
    with torch.no_grad():
        z = model(x).double()
    model.train(was)
    zy = z.gather(1, y[:, None])[:, 0]
    return zy - z.scatter(1, y[:, None], float("-inf")).max(dim=1).values


def run_audit(
    cfg: AuditConfig,
    *,
    model: nn.Module | None = None,
    data: tuple[TensorDataset, Tensor, Tensor] | None = None,
    progress: bool = False,
    gdp: bool = True,
) -> RunAudit:
    """Train ``model`` (default `make_model(cfg.model)`) with `make_private` on ``data`` plus canaries, and audit it.

    ``data``: (train set of (x, y), test x, test y), default scikit-learn's digits as in the demo;
    input canaries are uniform noise shaped like x with random labels. Sigma is calibrated so that
    the run spends cfg.epsilon at cfg.delta on the dataset that includes the included canaries.
    """
    if cfg.canary_norm < 1:
        raise ValueError(f"canary_norm must be >= 1 (a canary's gradient norm in units of R), got {cfg.canary_norm}")
    t0 = time.perf_counter()
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(62)
    if data is None:
        from dpkernels.demo import load_digits_split

        data = load_digits_split()
    train_set, x_test, y_test = data
    x_real, y_real = train_set.tensors[0], train_set.tensors[1]
    num_classes = int(max(y_real.max().item(), y_test.max().item() if len(y_test) else 0)) + 1
    if model is None:
        torch.manual_seed(seed)
        model = make_model(cfg.model)

    # The canaries and which of them are in: drawn from their own stream, independent of training's.
    g = torch.Generator().manual_seed(seed ^ 0x5A5A5A5A)
    m_in, m_g = cfg.input_canaries, cfg.gradient_canaries
    x_can = torch.rand((m_in, *x_real.shape[1:]), generator=g) * 2 - 1
    y_can = torch.randint(0, num_classes, (m_in,), generator=g)
    in_input = torch.rand(m_in, generator=g) < 0.5
    in_grad = torch.rand(m_g, generator=g) < 0.5

    # Rows: real examples, included input canaries, included gradient canaries (x = 0, only taps).
    idx_g = in_grad.nonzero().flatten()
    x = torch.cat([x_real, x_can[in_input], torch.zeros((len(idx_g), *x_real.shape[1:]))])
    y = torch.cat([y_real, y_can[in_input], torch.zeros(len(idx_g), dtype=torch.long)])
    tap = torch.full((len(x),), -1, dtype=torch.long)
    tap[len(x) - len(idx_g) :] = idx_g
    dataset = TensorDataset(x, y, tap)
    n = len(dataset)
    q = cfg.batch_size / n
    steps = math.ceil(cfg.epochs / q)

    wrapped = CanaryModel(model, m_g)
    margin0 = _logit_margin(wrapped.model, x_can, y_can) if m_in else None
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(wrapped.parameters(), lr=cfg.lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")
    net, private = dpkernels.make_private(  # converts wrapped's layers in place: net is wrapped
        wrapped,
        optimizer,
        target_epsilon=cfg.epsilon,
        target_delta=cfg.delta,
        sample_rate=q,
        dataset_size=n,
        steps=steps,
        max_grad_norm=cfg.max_grad_norm,
        seed=seed,
    )
    loader = poisson_loader(dataset, q, steps=steps, generator=torch.Generator().manual_seed(seed))
    c = cfg.canary_norm * cfg.max_grad_norm
    score_g = torch.zeros(max(m_g, 1), dtype=torch.float64)
    from tqdm.auto import tqdm

    for xb, yb, tb in tqdm(loader, total=steps, desc=f"audit {cfg.model}", disable=not progress, leave=False):
        if len(yb) > 0:  # an empty batch is a step of noise only: nothing to forward
            is_g = tb >= 0
            taps = torch.zeros(len(tb), max(m_g, 1))
            taps[is_g.nonzero().flatten(), tb[is_g]] = c
            logits, tapped = net(xb, taps)
            per_sample = torch.where(is_g, tapped, F.cross_entropy(logits, yb, reduction="none"))
            private.backward(per_sample.mean())
        private.step()
        grad = wrapped.canaries.weight.grad
        if grad is not None:
            score_g += grad[0].double()
        private.zero_grad(set_to_none=True)

    result = RunAudit(
        config=cfg,
        claimed_epsilon=private.accountant.get_epsilon(cfg.delta),
        noise_multiplier=private.engine.noise_multiplier,
        sample_rate=q,
        dataset_size=n,
        steps=steps,
        accuracy=float("nan"),
        seconds=0.0,
    )
    if len(y_test):  # top-1 correct: the label's logit margin is positive
        result.accuracy = (_logit_margin(wrapped.model, x_test, y_test) > 0).double().mean().item()
    if m_in:
        assert margin0 is not None
        score_in = _logit_margin(wrapped.model, x_can, y_can) - margin0
        result.input = audit_scores(score_in, in_input, beta=cfg.beta, delta=cfg.delta, gdp=gdp)
    if m_g:
        # In units of R summed over steps: each step's gradient is scaled by 1 / expected batch size.
        score = score_g * (q * n) / cfg.max_grad_norm
        result.gradient = audit_scores(score, in_grad, beta=cfg.beta, delta=cfg.delta, gdp=gdp)
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------- report


def _table(res: AuditResult) -> list[str]:
    rows = [
        "| k+ | k- | guesses r | correct v | precision | eps lower bound | mu lower bound | eps from mu |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in res.guesses:
        rows.append(
            f"| {g.k_plus} | {g.k_minus} | {g.guesses} | {g.correct} | {g.correct / g.guesses:.1%} | "
            f"{g.epsilon:.3f} | {g.mu:.3f} | {g.epsilon_gdp:.3f} |"
        )
    return rows


def format_report(run: RunAudit, command: str, plot_name: str | None) -> str:
    cfg = run.config
    opt = f"SGD lr {cfg.lr:g} momentum {cfg.momentum:g}" if cfg.optimizer == "sgd" else f"Adam lr {cfg.lr:g}"
    lines = [
        f"# One-run privacy audit: {cfg.model} on scikit-learn's digits",
        "",
        f"Command: `{command}`",
        "",
        f"DP-SGD through `make_private`: target epsilon {cfg.epsilon:g} at delta {cfg.delta:g}, noise multiplier "
        f"{run.noise_multiplier:.4f}, R = {cfg.max_grad_norm:g} (all-layer, abadi, book-keeping), Poisson rate "
        f"q = {run.sample_rate:.4f} over {run.dataset_size} rows (real examples + included canaries), "
        f"{run.steps} steps, {opt}, seed {cfg.seed}. Test accuracy "
        f"{run.accuracy:.1%}. Run time {run.seconds:.1f} s (training and bounds).",
        "",
        f"**Claimed epsilon (the accountant's, for the steps taken): {run.claimed_epsilon:.3f}** at delta "
        f"{cfg.delta:g}.",
        "",
    ]
    for title, res, what in (
        (
            "Gradient canaries (white-box)",
            run.gradient,
            f"each a row whose per-sample gradient is {cfg.canary_norm:g} R e_j on an extra Linear(m, 1) "
            f"(clipped to R by the engine); score = sum over steps of coordinate j of that layer's noised gradient",
        ),
        (
            "Input-space canaries (black-box)",
            run.input,
            "uniform-noise images with random labels; score = logit margin of the canary's label after "
            "training minus before",
        ),
    ):
        if res is None:
            continue
        lines += [
            f"## {title}",
            "",
            f"m = {res.m} canaries ({res.included} included), {what}. Each row of guesses is tested at "
            f"beta / {len(res.guesses)} (Bonferroni), so the best row holds at confidence {1 - res.beta:.0%}.",
            "",
            *_table(res),
            "",
            f"**Lower bounds (confidence {1 - res.beta:.0%}): epsilon >= {res.epsilon:.3f} (Steinke, Nasr & "
            f"Jagielski 2023, Theorem 3, at delta {res.delta:g}); mu >= {res.mu:.3f}, i.e. epsilon >= "
            f"{res.epsilon_gdp:.3f} for a run whose privacy is Gaussian (mu-GDP).** "
            f"Claimed: {run.claimed_epsilon:.3f}.",
            "",
        ]
    if plot_name:
        lines += [f"![score distributions]({plot_name})", ""]
    lines += [
        "A lower bound below the claimed epsilon is what a correct implementation gives (one-run audits are",
        "far from tight at epsilon of a few); one above it would show the run leaks more than claimed.",
    ]
    return "\n".join(lines) + "\n"


def plot_scores(run: RunAudit, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "the audit's plot needs matplotlib: pip install 'dpkernels[audit]' (or run without --out)"
        ) from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = (
        ("gradient canaries", run.gradient, "sum over steps of the canary's noised gradient coordinate (units of R)"),
        ("input canaries", run.input, "change of the logit margin of the canary's label"),
    )
    parts = [(n, r, x) for n, r, x in kinds if r is not None]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 3.8), squeeze=False)
    for ax, (name, res, xlabel) in zip(axes[0], parts, strict=True):
        bins = np.histogram_bin_edges(np.concatenate([res.in_scores, res.out_scores]), bins=40)
        ax.hist(res.out_scores, bins=bins, alpha=0.6, label=f"excluded ({len(res.out_scores)})")
        ax.hist(res.in_scores, bins=bins, alpha=0.6, label=f"included ({len(res.in_scores)})")
        ax.set_title(f"{run.config.model}: {name}\neps >= {res.epsilon:.2f}, claimed {run.claimed_epsilon:.2f}")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("canaries")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> tuple[AuditConfig, argparse.Namespace]:
    d = AuditConfig()
    p = argparse.ArgumentParser(
        prog="python -m dpkernels.audit",
        description="One-run privacy audit (Steinke, Nasr & Jagielski 2023) of DP-SGD training through make_private: "
        "canaries in with probability 1/2, scores after training, a lower bound on epsilon; writes a markdown report "
        "and a plot of the score distributions.",
    )
    p.add_argument("--model", choices=("cnn", "transformer"), default=d.model)
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="target epsilon (sigma is calibrated to it)")
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="expected Poisson batch size")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer, help="SGD has momentum 0.9")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--input-canaries", type=int, default=d.input_canaries, help="m of input-space canaries (0: none)")
    p.add_argument("--gradient-canaries", type=int, default=d.gradient_canaries, help="m of gradient canaries")
    p.add_argument("--canary-norm", type=float, default=d.canary_norm, help="gradient canary norm in units of R")
    p.add_argument("--beta", type=float, default=d.beta, help="1 - confidence of the bounds")
    p.add_argument("--seed", type=int, default=d.seed, help="canaries, inclusion, init, batches, noise (-1: OS)")
    p.add_argument("--no-gdp", action="store_true", help="skip the mu-GDP bound")
    p.add_argument("--out", type=Path, default=None, help="directory for report.md and scores.png")
    p.add_argument("--quick", action="store_true", help="one epoch, 200 canaries of each kind: for tests")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = AuditConfig(
        model=a.model,
        epochs=1.0 if a.quick else a.epochs,
        epsilon=a.epsilon,
        delta=a.delta,
        batch_size=a.batch_size,
        optimizer=a.optimizer,
        lr=a.lr,
        input_canaries=min(a.input_canaries, 200) if a.quick else a.input_canaries,
        gradient_canaries=min(a.gradient_canaries, 200) if a.quick else a.gradient_canaries,
        canary_norm=a.canary_norm,
        beta=a.beta,
        seed=None if a.seed == -1 else a.seed,
    )
    return cfg, a


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    threads = torch.get_num_threads()
    absl = logging.getLogger("absl")
    level = absl.level
    try:
        torch.set_num_threads(1)  # tiny ops; see the demo
        absl.setLevel(logging.ERROR)  # dp-accounting's calibration warns per dropped RDP order
        run = run_audit(cfg, progress=not args.no_progress, gdp=not args.no_gdp)
    finally:
        torch.set_num_threads(threads)
        absl.setLevel(level)
    command = "python -m dpkernels.audit " + " ".join(sys.argv[1:] if argv is None else argv)
    plot = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        plot = "scores.png"
        plot_scores(run, args.out / plot)
    report = format_report(run, command.strip(), plot)
    if args.out is not None:
        (args.out / "report.md").write_text(report)
    print(report)
    return 0


__all__ = [
    "AuditConfig",
    "AuditResult",
    "CanaryModel",
    "Guess",
    "RunAudit",
    "audit_scores",
    "count_correct",
    "default_guesses",
    "epsilon_lower_bound",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_mu_lower_bound",
    "gdp_p_value",
    "make_transformer",
    "p_value",
    "run_audit",
]

if __name__ == "__main__":
    sys.exit(main())
