"""DPOptimizer: the wrapped optimizer of a private model, its step and its saved state.

``optimizer.backward(loss)`` runs the engine's backward (both passes of two-pass); ``optimizer.step()``
finishes the step on the engine (noise for every parameter not yet noised, the data-parallel sum) and
then steps the wrapped optimizer; its state_dict holds the wrapped optimizer's state and the privacy
account, never the engine's secrets.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .engine import DetachedEngine, Engine


def optimizer_params(optimizer: Any) -> Iterator[tuple[str, Tensor]]:
    """Each parameter an optimizer steps, with where it sits ("param_groups[g]['params'][k]")."""
    for gi, group in enumerate(optimizer.param_groups):
        for k, p in enumerate(group["params"]):
            yield f"param_groups[{gi}]['params'][{k}]", p


def _check_dp_state(dp: Any) -> dict | None:
    """The saved account of a DPOptimizer.state_dict()'s "dpkernels" entry (None if it has none), after
    checking the entry's form: a bare KeyError or TypeError from a hand-made or truncated entry says nothing."""
    if dp is None:
        return None
    bad = ValueError(
        "the optimizer state's 'dpkernels' entry is malformed: expected {'steps': int >= 0, 'accountant': None or "
        "{'mechanism': 'rdp' or 'pld', 'history': [(noise_multiplier, sample_rate, steps), ...]}}, as "
        f"DPOptimizer.state_dict() writes it; got {dp!r:.200}"
    )
    if not isinstance(dp, dict) or not isinstance(dp.get("steps"), int) or dp["steps"] < 0:
        raise bad
    if not isinstance(dp.get("run", ""), str):
        raise bad
    saved = dp.get("accountant")
    if saved is None:
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("mechanism"), str):
        raise bad
    history = saved.get("history")
    if not isinstance(history, (list, tuple)) or not all(isinstance(h, (list, tuple)) and len(h) == 3 for h in history):
        raise bad
    return saved


def _continued(current: list, loaded: list, same_run: bool) -> list:
    """The account after loading a saved one: no release this optimizer made is forgotten.

    A state of this same run (a rollback to an earlier checkpoint, or a later one) keeps the longer of the
    two: the abandoned steps' noisy gradients were released (the model, logged losses, the decision to roll
    back) and stay counted. Another run's state (a resume) is that run's steps, then those this optimizer
    took already (none, for a fresh one)."""
    steps = lambda h: sum(n for _, _, n in h)  # noqa: E731
    if same_run:
        return list(current) if steps(current) >= steps(loaded) else loaded
    return loaded + list(current)


class DPOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer so that ``loss.backward(); optimizer.step()`` is one DP step.

    The update it applies uses  grad = (sum_i c_i g_i + N(0, sigma^2 R_total^2)) / expected_batch_size.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, engine: Engine, accountant: Any = None, sample_rate: float | None = None
    ):
        # No super().__init__: the wrapped optimizer owns param_groups and state.
        self.original_optimizer = optimizer
        self.engine = engine
        engine.accountant = accountant
        self.sample_rate = sample_rate
        self.budget: tuple[float, int] | None = None  # (target epsilon, steps sigma was calibrated for)
        self._over = False  # warned that the account went past the budget's steps
        self.parallel: Any = None  # dpkernels.distributed.DataParallelState when training data-parallel
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @property
    def accountant(self) -> Any:
        """The privacy account (an `Accountant`, or None without a sampling rate); kept by the engine, so that
        make_private again on the model continues it."""
        return self.engine.accountant

    @accountant.setter
    def accountant(self, value: Any) -> None:
        self.engine.accountant = value

    @property  # type: ignore[override]
    def param_groups(self):
        return self.original_optimizer.param_groups

    @property  # type: ignore[override]
    def state(self):
        return self.original_optimizer.state

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer's would keep param_groups and state only; the engine pickles as a DetachedEngine,
        # and a copy takes no part in a data-parallel run (a process group does not pickle)
        return dict(self.__dict__, parallel=None)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def backward(self, loss: Tensor, sample_mask: Tensor | None = None) -> None:
        """Backward for one micro-batch; needed for strategy="two-pass", equivalent to loss.backward() otherwise.
        ``loss`` may also be the (B,) per-sample losses: the safe form (see Engine.backward). ``sample_mask``:
        the mask of a padded batch (poisson_loader(..., pad_to=...)): rows False add nothing."""
        self.engine.backward(loss, sample_mask)

    # torch.amp.GradScaler.step then calls step() directly, with the scale in self.grad_scale: refused there.
    _step_supports_amp_scaling = True

    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        self.engine.check_live()
        if "grad_scale" in self.__dict__ or "found_inf" in self.__dict__:
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            released = bool(self.engine._noised)  # noised gradients were readable (unscale_ reads them)
            self.engine.abandon_step()
            if released:  # a release like any step's: accounted
                self._account_step()
            raise RuntimeError(
                "no step was taken: torch.amp.GradScaler cannot drive a DP step. The per-sample gradients are "
                "clipped during backward, where they still carry the scaler's factor S (clipping bound R would "
                "apply to S * g_i, the update would shrink by S), and a skipped step would depend on the batch. "
                "Train in bfloat16 (torch.autocast(device_type, dtype=torch.bfloat16), no loss scaling needed), "
                "or in float16 with a fixed loss scale: make_private(..., loss_scale=S) and "
                "optimizer.backward(S * losses) with the (B,) per-sample losses, which the engine divides out "
                "before clipping"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_params()
        if self.parallel is not None:
            self.parallel.observe_batch(self.engine.batch_size)
        self.engine.finish_step()
        adaptive = self.engine.adaptive
        if self.parallel is not None:  # every rank's noised share summed: one DP step of the global batch
            self.parallel.sum_grads(self.engine._params)
            if adaptive is not None:  # the noisy clip counts, summed like the gradients
                self.parallel.all_reduce([adaptive.released])
            try:
                self.parallel.agree_step(self.engine, self.accountant)
            except ValueError:
                for p in self.engine._params:  # a sum under too little noise on some coordinates: not kept
                    p.grad = None
                raise
        try:
            if adaptive is not None:
                adaptive.update(self.engine)
            self.original_optimizer.step()
        finally:  # the noisy gradients and counts are out: accounted even if the update of the bounds fails
            self._account_step()
        return loss

    def _account_step(self) -> None:
        if self.accountant is not None and self.sample_rate is not None:
            self.accountant.step(noise_multiplier=self.engine.noise_multiplier, sample_rate=self.sample_rate)
            # past the plan, once: the account can also jump past it (a loaded state, a rollback's kept steps)
            if self.budget is not None and self.accountant.steps > self.budget[1] and not self._over:
                self._over = True
                eps, planned = self.budget
                warnings.warn(
                    f"step {self.accountant.steps} is past the {planned} steps the noise multiplier was calibrated "
                    f"for: the privacy spent now exceeds target_epsilon={eps:g} "
                    f"(optimizer.accountant.get_epsilon(delta) gives it)",
                    stacklevel=3,
                )

    @property
    def max_grad_norm(self) -> float | list[float]:
        """The clipping bound R (one group) or the bounds R_g per group, as they are now (they move with
        adaptive clipping, dpkernels.adaptive)."""
        bounds = list(self.engine.bounds)
        return bounds[0] if len(bounds) == 1 else bounds

    def _check_params(self) -> None:
        """No parameter the engine does not cover may carry a gradient into the step (one added to the
        optimizer after make_private, or a frozen one unfrozen since): it would not be private."""
        for where, p in optimizer_params(self):
            if self.engine.covers(p) and not p.requires_grad:
                raise RuntimeError(
                    f"no step was taken: {where} (shape {tuple(p.shape)}) was frozen after make_private, but the "
                    f"engine still clips and noises it with the others and the optimizer would step it. Freeze "
                    f"parameters before make_private, or call make_private again on the model (with "
                    f"optimizer.original_optimizer) when the set of trainable parameters changes."
                )
            if (p.requires_grad or p.grad is not None) and not self.engine.covers(p):
                raise RuntimeError(
                    f"no step was taken: {where} (shape {tuple(p.shape)}) is trainable or has a gradient, but the "
                    f"DP engine does not make it private (added to the optimizer after make_private, or unfrozen "
                    f"since?). Call make_private again on the model (and an optimizer) holding it, or freeze it "
                    f"and set its .grad to None."
                )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        """The wrapped optimizer's state, plus under "dpkernels" the steps taken and the accountant's
        history: a run resumed from it keeps counting its privacy spend, and draws the noise of its
        next step, not of its first (with a fixed seed the noise streams are functions of the step).
        The noise seed itself is never saved: whoever holds it can subtract the noise."""
        state = self.original_optimizer.state_dict()
        acct = self.accountant
        state["dpkernels"] = {
            "run": self.engine.run_id,
            "steps": self.engine.steps,
            "accountant": None if acct is None else {"mechanism": acct.mechanism, "history": list(acct.history)},
        }
        if self.engine.adaptive is not None:  # adaptive clipping's bounds: DP outputs (of the noisy counts)
            state["dpkernels"]["adaptive_bounds"] = list(self.engine.bounds)
        return state

    def load_state_dict(self, state_dict) -> None:
        state = dict(state_dict)
        dp = state.pop("dpkernels", None)
        saved = _check_dp_state(dp)
        if self.engine.adaptive is not None and dp is not None and "adaptive_bounds" in dp:
            self.engine.adaptive.restore(self.engine, dp["adaptive_bounds"])  # checked before anything is loaded
        if self.accountant is not None and saved is not None and saved["mechanism"] != self.accountant.mechanism:
            raise ValueError(
                f"the saved privacy account uses {saved['mechanism']!r}, this optimizer's "
                f"{self.accountant.mechanism!r}: make_private(..., accountant={saved['mechanism']!r})"
            )
        self.original_optimizer.load_state_dict(state)
        if dp is None:
            warnings.warn(
                "this optimizer state has no dpkernels entry (steps taken, privacy spent): the accountant starts "
                "from zero and, with a fixed seed, the next steps draw the noise of the first ones again",
                stacklevel=2,
            )
            return
        self.engine.steps = int(dp["steps"])
        self.engine.stream = max(self.engine.stream, self.engine.steps)  # a rollback draws fresh noise
        same_run = dp.get("run") == self.engine.run_id
        if isinstance(dp.get("run"), str):
            self.engine.run_id = dp["run"]  # a resumed run goes on under its name
        if self.accountant is not None and saved is not None:
            loaded = [(float(s), float(q), int(n)) for s, q, n in saved["history"]]
            self.accountant.history = _continued(self.accountant.history, loaded, same_run)
        elif self.accountant is not None or saved is not None:
            warnings.warn(
                "only one of the saved state and this optimizer has a privacy account (sample_rate or "
                "dataset_size given to make_private): the account was not restored",
                stacklevel=2,
            )

    def __repr__(self) -> str:
        if isinstance(self.engine, DetachedEngine):
            return f"DPOptimizer({self.original_optimizer!r}, copied without its engine)"
        return (
            f"DPOptimizer({self.original_optimizer!r}, sigma={self.engine.noise_multiplier}, R={self.engine.r_total})"
        )
