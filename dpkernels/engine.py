"""The per-step state of DP training, and the optimizer wrapper.

Data flow of one logical step (docs/design.md, section 4):

    forward     every DP layer that will need per-sample work counts a *use*
    backward    each use hands (saved input, output gradient G) to `Engine.on_backward`;
                when every use of a layer (of a *tie*: layers sharing a parameter)
                has arrived its per-sample squared norms go to its clipping groups;
                when a group has all its norms its clip factors are known and its
                parameters' clipped sums are computed at once (book-keeping), the
                (input, G) pairs released
    end of backward   groups still open (a layer whose output never reached the loss)
                are finished with what arrived
    optimizer.step()  every parameter not yet noised gets scale * (acc + sigma R_total z)

The noise is fused into the last micro-batch's clipped sum when the engine knows
it is the last (``accumulation_steps``); otherwise it is added at ``step()``.
``p.grad`` is *set* by the DP step (never accumulated across steps): micro-batch
sums live in the engine until the step.

Strategies: "bk" (book-keeping, one backward) and "two-pass" (ghost clipping:
`DPOptimizer.backward(loss)` runs a norms-only backward, then a second backward in
which each layer clips its own G rows with the now-known factors; no (A, G) is
kept between the passes).
"""

from __future__ import annotations

import contextlib
import functools
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from . import padding, pruning
from .clipping import clip_factors
from .config import EngineConfig
from .nn import DPModule
from .noise import NoisePlan
from .noise import mix64 as _mix64  # noqa: F401  (dpkernels.api, perturb, distributed import it from here)
from .ops._validate import ids_looked_up
from .ops.bounds import check_gradual_underflow, workers_flush
from .perturb import Perturbation
from .strategies import make_strategy


@dataclass
class SumSpec:
    """What a layer's clipped sum for one parameter needs: scale * (prev + sum_i c_i g_i + noise_std z)."""

    c: Tensor
    prev: Tensor | None = None
    noise_std: float = 0.0
    scale: float = 1.0
    seed: int = 0


Use = tuple[Any, Tensor]  # (what forward saved for the engine, output gradient G)


@dataclass(eq=False)
class TieState:
    """What one backward pass holds of a tie: its uses so far and how far its work went."""

    arrived: int = 0
    uses: dict[nn.Module, list[Use]] = field(default_factory=dict)
    summed: set[int] = field(default_factory=set)  # ids of params whose clipped sum is done
    reported: bool = False  # its norms were taken (or, in the clipping pass of two-pass, its sums)


class _StateField:
    """A Tie attribute that reads and writes the same-named field of the tie's current `TieState`."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, tie: Any, owner: type | None = None) -> Any:
        return self if tie is None else getattr(tie.state, self.name)

    def __set__(self, tie: Any, value: Any) -> None:
        setattr(tie.state, self.name, value)


@dataclass(eq=False)
class Tie:
    """DP modules that share trainable parameters: the unit of per-sample norm computation.

    ``expected`` counts the uses of the forward (kept across the two passes of two-pass); what the
    backward pass in progress holds of the tie is ``state``, a `TieState` of the engine's `BackwardPass`
    (``uses``, ``arrived``, ``summed``, ``reported`` read it)."""

    modules: list[nn.Module]
    names: list[str]
    params: list[nn.Parameter]
    expected: int = 0  # uses counted in forward since the last backward
    state: TieState = field(default_factory=TieState)

    uses = _StateField()
    summed = _StateField()
    arrived = _StateField()
    reported = _StateField()

    def owners(self, p: nn.Parameter) -> list[nn.Module]:
        return [m for m in self.modules if any(q is p for q in m.parameters(recurse=False))]


class BackwardPass:
    """Everything that lives for one backward pass (one micro-batch, or one of two-pass's passes): the
    batch size, each tie's uses (`TieState`), per group the squared norms sent so far, the ties still
    to report and whether it closed, the closed groups' norms (checked finite at the end), the results
    staged until the end. Ending or aborting a pass drops this object: nothing is reset field by field."""

    def __init__(self, engine: Engine):
        G = len(engine.groups)
        self.batch: int | None = None
        self.norms: list[list[Tensor]] = [[] for _ in range(G)]  # per group: its parameters' squared norms
        self.left = [sum(1 for t in ties if t.expected > 0) for ties in engine._ties_of_group]
        self.done = [False] * G
        self.closed: list[Tensor] = []  # the closed groups' squared norms, (G, B) at the end: one finiteness read
        # results wait here until the pass ends, so that an error in backward leaves .grad untouched
        self.staged: list[tuple[nn.Parameter, Tensor, bool]] = []
        self.acc_touched = False  # this pass replaced sums in the engine's _acc in place of staging them
        for t in engine.ties:
            t.state = TieState()


def dp_function(module: Any) -> Any:
    """The autograd Function class (with its ``norms`` and ``clipped_sum``) of a DP module; for a module with
    pruning masks on its parameters, their masked norms and sums (dpkernels.pruning)."""
    fn = type(module).dp_function
    return pruning.masked_function(module, fn) if pruning.has_masks(module) else fn


class ParameterGradRequested(RuntimeError):
    """torch.autograd.grad(..., inputs=[p]) with a DP parameter p among the inputs."""


def _will_run(node: Any) -> bool:
    """Whether the backward pass running now will execute autograd node ``node``."""
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError as e:  # autograd.grad(..., inputs=[p]) on p's AccumulateGrad: it asks for p's gradient
        raise ParameterGradRequested() from e


def will_accumulate(params: Sequence[Tensor], node: Any = None) -> bool:
    """Whether the backward pass running now asks for a gradient of one of ``params``: ``loss.backward()``
    or ``backward(inputs=...)``/``autograd.grad(..., inputs=...)`` naming one; not ``autograd.grad(loss, x)``
    (an input-gradient probe) nor ``backward(inputs=[x])``. Called from a DP layer's backward, ``node``
    its autograd node (``ctx``): the parameters' AccumulateGrad nodes among its inputs are checked
    without building any (the others cost one tiny view each)."""
    params = [p for p in params if p.requires_grad]
    found: dict[int, Any] = {}
    if node is not None:
        # the parameters' AccumulateGrad nodes among the node's inputs, or behind a view or cast of one
        # (w.t(), an autocast copy, a slice): nodes of a single input, at most three deep
        todo = [(fn, 0) for fn, _ in node.next_functions if fn is not None]
        while todo:
            fn, depth = todo.pop()
            var = getattr(fn, "variable", None)  # an AccumulateGrad's parameter
            if var is not None:
                found[id(var)] = fn
            elif depth < 2 and len(fn.next_functions) == 1 and fn.next_functions[0][0] is not None:
                todo.append((fn.next_functions[0][0], depth + 1))
    for p in params:
        if id(p) in found and _will_run(found[id(p)]):
            return True
    return any(_will_run(torch.autograd.graph.get_gradient_edge(p).node) for p in params if id(p) not in found)


def _is_engine_hook(hook: Any) -> bool:
    return bool(getattr(hook, "_dpkernels_engine_hook", False))


def foreign_hooks(p: Tensor) -> list[str]:
    """The kinds of gradient hooks on parameter ``p`` that are not a DP engine's own."""
    out = []
    if any(not _is_engine_hook(h) for h in (p._backward_hooks or {}).values()):
        out.append("Tensor.register_hook")
    if getattr(p, "_post_accumulate_grad_hooks", None):
        out.append("Tensor.register_post_accumulate_grad_hook")
    return out


def check_param_hooks(params: Sequence[Tensor], names: dict[int, str]) -> None:
    """Refuse gradient hooks on DP parameters: autograd hands a DP parameter no gradient (its DP layer
    returns None for it; the engine writes the private gradient itself at the end of the pass or at the
    step), so a hook would see None, or post-process a gradient that is not the private one."""
    for p in params:
        kinds = foreign_hooks(p)
        if kinds:
            raise RuntimeError(
                f"parameter {names.get(id(p), tuple(p.shape))!r} has a {' and a '.join(kinds)} hook: a DP "
                f"parameter's gradient is written by the DP engine after backward (noise included), never handed "
                f"to autograd, so the hook would see None. Remove the hook (handle.remove()); to transform the "
                f"private gradient, do it on p.grad after backward, or in a step pre-hook of the wrapped optimizer "
                f"(optimizer.original_optimizer.register_step_pre_hook)."
            )


_COPIED = (
    "was copied, pickled or loaded from a private model, and a DP engine (noise seed, clip factors, the step in "
    "progress) is never copied or saved. Call dpkernels.make_private on the copy (with an optimizer of its "
    "parameters) before training it; optimizer.load_state_dict(a saved DPOptimizer.state_dict()) then continues "
    "the privacy account and the step count"
)
_LEFT_OUT = (
    "was left out when make_private was called again on its model (its parameters were frozen then), so no DP "
    "engine clips or noises it. Call make_private again with its parameters trainable"
)


class DetachedEngine:
    """What an `Engine` becomes in a pickle, ``torch.save`` or ``copy.deepcopy`` of a private model or
    optimizer (nothing of the engine is copied: seed, clip factors, norms, batch sizes, accumulated sums),
    and what a DP layer left out by a later make_private call is attached to.

    A DP layer attached to it computes its forward as before (inference works, and so do input-gradient
    probes), but a backward pass that asks for its parameters' gradients raises, as does any use of an
    optimizer holding it: the model must go through `make_private` again."""

    enabled = False
    accountant = None
    retired = None
    _name_of: dict = {}

    def __init__(self, why: str = _COPIED):
        self.why = why
        self.batch_size: int | None = None

    def __reduce__(self) -> tuple:
        return (DetachedEngine, (self.why,))

    def active(self) -> bool:
        return torch.is_grad_enabled()

    def wants(self, module: nn.Module) -> bool:
        return torch.is_grad_enabled()

    def on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for x in list(args) + list(kwargs.values()):
            if isinstance(x, Tensor) and x.dim() > 0:
                self.batch_size = x.shape[0]
                return
        self.batch_size = None

    def on_backward(self, module: nn.Module, saved: Any, g: Tensor, node: Any = None) -> None:
        try:
            asks = will_accumulate(list(module.parameters(recurse=False)), node)
        except ParameterGradRequested:
            asks = True
        if asks:
            raise RuntimeError(f"DP layer {type(module).__name__} {self.why}.")

    def check_live(self) -> None:
        raise RuntimeError(f"this DP optimizer {self.why}.")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # Python's protocol probes (copy, pickle, hasattr) get the usual answer
            raise AttributeError(name)
        raise RuntimeError(f"this DP optimizer {self.why}.")


def model_forward_hook(engine: Any, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """The private model's forward pre-hook. A function of the engine, not its bound method: a deep copy
    of the model then calls the copy's `DetachedEngine`, never the original engine's method on it."""
    engine.on_model_forward(module, args, kwargs)


def attached_engine(model: nn.Module) -> Engine | None:
    """The engine the model's DP layers report to (a private model's), or None."""
    found: dict[int, tuple[str, Engine]] = {}
    for name, m in model.named_modules():
        eng = m.__dict__.get("_dp_engine")
        if isinstance(eng, Engine):
            found.setdefault(id(eng), (name or "<model>", eng))
    if len(found) > 1:
        names = ", ".join(repr(n) for n, _ in found.values())
        raise ValueError(
            f"the model's DP layers belong to {len(found)} private models made separately (modules {names}): one "
            f"run cannot continue all of their privacy accounts. Call make_private once, on the whole model"
        )
    return next(iter(found.values()))[1] if found else None


class Engine:
    """Per-sample norms, clipping and noise for a set of DP modules.

    Nothing of an engine is ever saved or copied: pickling or deep-copying it (through a private model's
    layers, or a DPOptimizer) gives a `DetachedEngine`, so that no saved file or copy holds the noise
    seed, a batch's clip factors, norms or size, or the noiseless sums of an unfinished step.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        ties: list[Tie],
        groups: list[list[nn.Parameter]],
        bounds: Sequence[float] | None = None,
        *,
        config: EngineConfig | None = None,
        **settings: Any,
    ):
        """``config``, or the bounds and the settings of an `EngineConfig` (validated here)."""
        if config is None:
            config = EngineConfig(bounds=tuple(bounds if bounds is not None else ()), **settings)
        elif bounds is not None or settings:
            raise TypeError("Engine: give either config or the bounds and settings, not both")
        if len(config.bounds) != len(groups):
            raise ValueError(f"the config has {len(config.bounds)} bounds for {len(groups)} clipping groups")
        self.config = config
        self.modules = modules
        self.ties = ties
        self.groups = groups
        self.bounds = list(config.bounds)  # as they are now: they move under adaptive clipping
        self.noise = NoisePlan(config)
        self.adaptive: Any = None  # dpkernels.adaptive.AdaptiveState with adaptive clipping
        self._per_sample_losses = False  # this backward is of sum_i l_i given per sample (see backward)
        # the model's parameters and buffers at attach(), by name: 16-bit ones refuse a mean loss (refuse_16bit_mean)
        self._model_tensors: list[tuple[str, Tensor]] = []
        self._sample_mask: Tensor | None = None  # padded rows False: their clip factor is 0 (dpkernels.padding)
        self.sharding: Any = None  # dpkernels.fsdp.ShardedParams when the model is sharded by fully_shard
        self.parallel: Any = None  # dpkernels.distributed.DataParallelState when training data-parallel
        self.enabled = True
        self.batch_size: int | None = None  # the model's batch, read by a forward pre-hook
        self.steps = 0
        # clip(g_i + k zeta_i) (dpkernels.perturb); None: plain clipping
        self.perturb = Perturbation(config.perturb_k) if config.perturb_k != 0.0 else None

        self._tie_of = {m: t for t in ties for m in t.modules}
        self._name_of = {m: n for n, m in modules.items()}
        self._group_of = {id(p): gi for gi, ps in enumerate(groups) for p in ps}
        self._params = [p for ps in groups for p in ps]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        # the clip factors of a group in the dtype its layers sum in: float64 when all its parameters are (a
        # float32 layer would round float64 factors to nearest; float32 ones are exact in a float64 sum)
        self._factor_dtype = [
            torch.float64 if all(p.dtype == torch.float64 for p in ps) else torch.float32 for ps in groups
        ]
        self._ties_of_group = [
            [t for t in ties if any(id(p) in {id(q) for q in ps} for p in t.params)] for ps in groups
        ]
        self._acc: dict[int, Tensor] = {}  # raw clipped sums of earlier micro-batches
        self._noised: set[int] = set()
        # A pass's results wait in its staged list until it ends, so that an error in backward (a NaN norm in a
        # lower layer, a layer reporting late) leaves .grad untouched. The sums carried between
        # micro-batches wait too with several groups, where one can be summed before a later layer's
        # norms are checked; a single group is summed after every norm is checked, and there they are
        # replaced at once (no second copy): an error after that loses them, and the step says so.
        self._stage = len(groups) > 1
        self._acc_lost: str | None = None  # why the accumulated micro-batches were lost, until step()
        self._micro = 0
        self._strategy = make_strategy(config.strategy)  # runs the passes; says what the pass in progress does
        self._factors: list[Tensor | None] = [None] * len(groups)
        # nonfinite="drop": the batch's samples given c_i = 0 for a non-finite norm in some group (B,) bool, and
        # their count since make_private (int64), both on the device: read only by dropped_samples()
        self._drop_mask: Tensor | None = None
        self._dropped: Tensor | None = None
        self._count_task = -1  # the graph task _counting describes
        self._counting: dict[Tie, bool] = {}  # per tie: does that pass ask for its parameters' gradients
        self._pass: BackwardPass | None = None  # the backward pass in progress
        # (ok, check raising by name), read with the backward pass's one host read: ok a 0-d bool tensor on the
        # device, or a callable making it when due (None: nothing to check): module state hashed around a
        # training forward and its backward (dpkernels.guard), a padded batch's mask (dpkernels.padding)
        self.deferred_checks: list[tuple[Tensor | Callable[[], Tensor | None], Callable[[], None]]] = []
        self.accountant: Any = None  # the privacy account, kept here so that make_private again continues it
        # names this run in the optimizer's saved states (not a secret): loading a state of the same run is a
        # rollback, whose abandoned steps were released all the same (DPOptimizer.load_state_dict)
        self.run_id = secrets.token_hex(8)
        self.retired: str | None = None  # why this engine no longer trains its model
        self._handles: list[Any] = []  # hooks to remove when retired
        self._pname = {id(q): f"{n}.{k}" for n, m in modules.items() for k, q in m.named_parameters(recurse=False)}
        check_param_hooks(self._params, self._pname)
        # The DP layers hand their parameters' gradients to the engine, never to autograd: a gradient
        # autograd computes for one comes from a use outside them (x @ emb.weight.T), whose per-sample
        # norm nobody takes. Its .grad would be replaced at the end of the pass, the use silently dropped.
        # (module, attribute, parameter) of each engine parameter: a wrapper that swaps a module's parameters
        # for new objects (FSDP's fully_shard, a re-assigned weight) would leave the engine noising stale ones.
        self._owned = [
            (m, k, q) for m in modules.values() for k, q in m.named_parameters(recurse=False) if id(q) in self._index
        ]
        self._owner_of = {id(q): (m, k) for m, k, q in self._owned}  # a parameter's module: its pruning mask
        for q in self._params:
            hook = functools.partial(self._raw_use, self._pname.get(id(q), str(tuple(q.shape))))
            hook._dpkernels_engine_hook = True  # type: ignore[attr-defined]
            self._handles.append(q.register_hook(hook))

    def __reduce__(self) -> tuple:
        return (DetachedEngine, ())

    # ------------------------------------------------------------------ the settings (self.config) and noise plan
    noise_multiplier = property(lambda self: self.config.noise_multiplier, doc="the accounted sigma")
    expected_batch_size = property(lambda self: self.config.expected_batch_size)
    clipping = property(lambda self: self.config.clipping)
    gamma = property(lambda self: self.config.gamma)
    strategy = property(lambda self: self.config.strategy)
    loss_reduction = property(lambda self: self.config.loss_reduction)
    accumulation_steps = property(lambda self: self.config.accumulation_steps)
    static_loss_scale = property(
        lambda self: self.config.loss_scale, doc="S of make_private(loss_scale=S): the loss was multiplied by S"
    )
    secure = property(lambda self: self.noise.secure)
    nonfinite = property(lambda self: self.config.nonfinite, doc='"raise" or "drop": see make_private')

    def _plan_attr(name: str, doc: str) -> Any:  # type: ignore[misc]
        def get(self: Engine) -> Any:
            return getattr(self.noise, name)

        def put(self: Engine, value: Any) -> None:
            setattr(self.noise, name, value)

        return property(get, put, doc=doc)

    seed = _plan_attr("seed", "the noise seed (never saved)")
    stream = _plan_attr("stream", "the step index keying the noise streams: moves with steps, never back")
    world_size = _plan_attr("world_size", "data-parallel ranks summing their noised shares")
    rank = _plan_attr("rank", "this process's rank")
    r_total = _plan_attr("r_total", "R_total = sqrt(sum_g R_g^2) of the bounds as they are now")
    grad_noise_multiplier = _plan_attr("noise_multiplier", "the gradient's sigma: higher with adaptive clipping")
    del _plan_attr

    # ------------------------------------------------------------------ one run across make_private calls
    def check_replaceable(self) -> None:
        """make_private again on this engine's model: refused while a logical step is half done."""
        if self._micro > 0 or self._acc:
            raise RuntimeError(
                f"make_private was called again on a model with {self._micro} of {self.accumulation_steps} "
                f"micro-batches of a step accumulated: call optimizer.step() first, so that no clipped sum is "
                f"lost or carried into the new engine"
            )

    def attach(self, model: nn.Module) -> None:
        """Attach to ``model``: its DP modules report here, and a forward pre-hook reads its batch size.
        The hook of an earlier engine (make_private again), or of a copy's `DetachedEngine`, is removed."""
        for k, h in list(model._forward_pre_hooks.items()):
            if isinstance(h, functools.partial) and h.func is model_forward_hook:
                del model._forward_pre_hooks[k]
                model._forward_pre_hooks_with_kwargs.pop(k, None)
        for m in self.modules.values():
            m._dp_engine = self  # type: ignore[assignment]
        self._model_tensors = [*model.named_parameters(), *model.named_buffers()]
        hook = functools.partial(model_forward_hook, self)
        self._handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))

    def continue_from(self, old: Engine, keep_seed: bool) -> None:
        """Take over ``old``'s step counter, and its noise seed if ``keep_seed`` (no seed given to this call):
        one run, whose noise streams (functions of the seed and the step) never repeat across make_private
        calls, as a run restarting its step counter with the same seed would."""
        if keep_seed:
            self.seed = old.seed
        self.run_id = old.run_id
        self.steps = old.steps
        self.stream = old.stream
        self._dropped = old._dropped

    def retire(self) -> None:
        """Stop training (make_private was called again on the model): hooks removed, per-step state
        dropped. Call it after the new engine is attached: the DP layers still attached to this one (frozen
        since) get a `DetachedEngine` saying why."""
        self._abort()
        self._acc.clear()
        self._noised.clear()
        self.enabled = False
        self.retired = "belongs to a model that a later make_private call made private again"
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self.modules.values():
            if m._dp_engine is self:
                m._dp_engine = DetachedEngine(_LEFT_OUT)  # type: ignore[assignment]

    def check_live(self) -> None:
        if self.retired is not None:
            raise RuntimeError(f"this DP optimizer {self.retired}: use the optimizer that call returned")

    # ------------------------------------------------------------------ forward
    def active(self) -> bool:
        """Whether DP training is on here: the engine enabled and autograd recording."""
        return self.enabled and torch.is_grad_enabled()

    def wants(self, module: nn.Module) -> bool:
        """Whether this forward call of ``module`` needs per-sample work (and so counts a use)."""
        if not self.active():
            return False
        tie = self._tie_of.get(module)
        if tie is None:
            return False
        if self._strategy.name == "two-pass" and torch._C._current_graph_task_id() != -1:
            # A forward inside a backward is a recomputation (activation checkpointing). Two-pass would clip
            # the clipping pass's recomputed (A, G) by the norms of the norms pass's: unless the two
            # recomputations are bitwise equal (dropout without preserve_rng_state, non-deterministic
            # kernels), one sample then moves the update past R. Book-keeping measures and sums one set.
            raise RuntimeError(
                f"DP layer {self._name_of.get(module, type(module).__name__)!r} ran its forward again inside a "
                f"backward pass (activation checkpointing recomputes it): strategy='two-pass' would clip the "
                f"recomputed tensors of its second pass by the norms of its first pass's, which need not be equal "
                f"(dropout without preserve_rng_state, non-deterministic kernels). Use strategy='bk' with "
                f"activation checkpointing."
            )
        tie.expected += 1
        return True

    def on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model: remember the batch size of its first tensor input."""
        # In a backward pass that failed outside the DP layers, neither on_backward nor the end-of-pass
        # callback saw the error: drop what it left. A forward inside a backward (activation
        # checkpointing recomputes) is not that: autograd's graph task id is -1 outside backward only.
        if self._pass is not None and torch._C._current_graph_task_id() == -1:
            self._abort()
        ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        if ddp is not None:
            raise RuntimeError(
                f"the DP model runs inside a {type(ddp).__name__}: data-parallel training is not supported. The "
                f"engine writes each parameter's private gradient at the end of backward, outside the wrapper's "
                f"all-reduce, which would then overwrite or miss it. Use make_private(model, optimizer, ..., "
                f"distributed=True) on the unwrapped model instead: it sums the clipped gradients across ranks."
            )
        for m, k, q in () if self.sharding is not None else self._owned:  # sharded: checked by sharding.canonical
            if m._parameters.get(k) is not q:
                raise RuntimeError(
                    f"parameter {self._name_of.get(m, type(m).__name__)}.{k} was replaced after make_private (by "
                    f"torch.distributed.fsdp.fully_shard, which shards parameters into new tensors, or by assigning "
                    f"a new parameter): the engine would clip and noise the old one. FSDP is not supported yet: for "
                    f"data-parallel training use make_private(model, optimizer, ..., distributed=True) on the "
                    f"unsharded model; after replacing a parameter, call make_private again."
                )
        for x in list(args) + list(kwargs.values()):
            if isinstance(x, Tensor) and x.dim() > 0:
                self.batch_size = x.shape[0]
                return
        self.batch_size = None

    # ------------------------------------------------------------------ backward
    def _drop_pass(self) -> None:
        """The pass in progress is over (ended or aborted): its state goes, the ties' with it."""
        self._pass = None
        for t in self.ties:
            t.state = TieState()

    @property
    def _batch(self) -> int | None:
        return self._pass.batch if self._pass is not None else None

    def _begin_backward(self) -> None:
        self.check_live()
        self._strategy.check_pass()
        if any(p.device.type == "cpu" for p in self._params):  # flush-to-zero CPU arithmetic refused
            check_gradual_underflow()  # this thread; torch's workers with the pass's one host read:
            flush = workers_flush(torch.get_num_threads())
            self.deferred_checks.append((~flush, functools.partial(check_gradual_underflow, threads=True)))
        if self._micro >= self.accumulation_steps:
            raise RuntimeError(
                f"a backward pass after {self.accumulation_steps} micro-batch(es) without optimizer.step(): "
                f"noise was already added; pass accumulation_steps=k to make_private to accumulate k micro-batches"
            )
        check_param_hooks(self._params, self._pname)
        padding.check_mask_given(self._sample_mask is not None)
        if self.parallel is not None and self._micro == 0 and self._strategy.takes_norms:
            self.parallel.reset_step()  # a new logical step: nothing of an abandoned one is all-reduced
        if self._strategy.takes_norms:  # the clipping pass of two-pass keeps the norms pass's factors
            self._factors = [None] * len(self.groups)
            self._drop_mask = None
            if self.adaptive is not None:
                self.adaptive.begin_pass()
        self._pass = BackwardPass(self)
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _check_batch(self, module: nn.Module, B: int, model_batch: int | None) -> None:
        """``model_batch``: the model's batch at the forward of this use."""
        name = self._name_of.get(module, type(module).__name__)
        assert self._pass is not None
        if self._pass.batch is None:
            self._pass.batch = B
        if model_batch is not None and model_batch == B and self._batch != B:
            raise RuntimeError(
                f"DP layer {name!r} saw a batch of {B} samples in a backward pass whose other uses had "
                f"{self._batch}: the model was called on batches of different sizes (x and x[2:], say) whose "
                f"losses were summed into one backward. Every forward of one backward pass must see the same "
                f"samples in the same order: call backward on each batch's loss separately (accumulation_steps "
                f"for micro-batches of one Poisson batch)"
            )
        if self._batch != B or (model_batch is not None and model_batch != B):
            want = model_batch if model_batch is not None else self._batch
            raise RuntimeError(
                f"DP layer {name!r} saw a batch of {B} samples while the model's batch has {want}: an input "
                f"broadcast across the batch (or a batch that is not the first dimension) loses the "
                f"per-sample gradients. Expand that input to the batch (x.expand({want}, ...)) before the layer; "
                f"an input flattened with the batch (x.view(-1, d)) must keep it as its own dimension ((B, T, d)). "
                f"The model's batch is read from dimension 0 of its first tensor input: a model whose input is "
                f"sequence-first (an RNN or MultiheadAttention with batch_first=False at its start) must be given "
                f"its input batch-first (batch_first=True)."
            )

    def loss_scale(self) -> float:
        """G that a layer sees is g_i * loss_scale^-1: B / S for a mean loss, 1 / S for a sum (and for
        per-sample losses given to `backward`, whose sum the engine backpropagates itself)."""
        mean = self.loss_reduction == "mean" and not self._per_sample_losses
        return (float(self._batch or 0) if mean else 1.0) / self.static_loss_scale

    def on_backward(self, module: nn.Module, saved: Any, g: Tensor, node: Any = None) -> None:
        """Called by a DP layer's backward with what its forward saved, its output gradient and its
        autograd node (``ctx``). Only a pass that asks for the layer's parameters' gradients counts
        (`will_accumulate`): an input-gradient probe (``autograd.grad(loss, x)``) leaves the step as it was."""
        tie = self._tie_of.get(module)
        if tie is None:
            raise RuntimeError(
                f"{module._dp_name() if isinstance(module, DPModule) else type(module).__name__} reported to a DP "
                f"engine that does not cover it: call make_private on the model again"
            )
        if not self._counts(tie, node):
            return
        try:
            with ids_looked_up(), self._canonical():  # ids: passed F.embedding's own range check in forward
                self._on_backward(module, tie, saved, g, node)
        except BaseException:
            self._abort()
            raise

    def _counts(self, tie: Tie, node: Any) -> bool:
        """Whether the pass running now asks for the gradients of ``tie``'s parameters; one answer per pass."""
        if not self._strategy.sums:  # two-pass's norms pass: the engine's own autograd.grad
            return True
        task = torch._C._current_graph_task_id()
        if task != self._count_task:
            self._count_task = task
            self._counting = {}
        hit = self._counting.get(tie)
        if hit is None:
            try:
                hit = self._counting[tie] = will_accumulate(self._graph_params(tie.params), node)
            except ParameterGradRequested:
                self._abort()
                names = [self._pname.get(id(p), str(tuple(p.shape))) for p in tie.params]
                raise RuntimeError(
                    f"torch.autograd.grad was asked for the gradient of DP parameter(s) {names}: a DP layer never "
                    f"hands its parameters' gradients to autograd (it would have to return the non-private sum over "
                    f"the batch), so autograd.grad would return None and the batch would be counted as a step. Call "
                    f"loss.backward() (or optimizer.backward(per_sample_losses)) and read p.grad, which is private; "
                    f"for input gradients, ask autograd.grad for the inputs only"
                ) from None
        return hit

    def _graph_params(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The tensors autograd sees for ``params`` (FSDP2's unsharded parameters for sharded ones)."""
        return list(params) if self.sharding is None else self.sharding.graph_params(params)

    def _canonical(self) -> Any:
        """With FSDP2, the engine's own (sharded) parameters on the DP modules while it works on them."""
        if self.sharding is None:
            return contextlib.nullcontext()
        return self.sharding.canonical(self._owned, self._name_of)

    def _write_grad(self, p: nn.Parameter, grad: Tensor) -> None:
        """A parameter's final (noised) gradient: its .grad, or with FSDP2 the share awaiting the reduce-scatter."""
        if self.sharding is not None and self.sharding.manages(p):
            self.sharding.write(p, grad)
        else:
            p.grad = grad

    def _raw_use(self, name: str, grad: Tensor | None) -> None:
        if grad is None or not self.enabled:  # None: a DP layer's backward (it returns no parameter grads)
            return
        self._abort()
        raise RuntimeError(
            f"parameter {name!r} is used outside its DP layers (e.g. x @ embedding.weight.T): autograd computed a "
            f"gradient for it that has no per-sample norm. Route that use through a DP layer, e.g. an nn.Linear "
            f"tied to it (head.weight = embedding.weight), which make_private computes exactly."
        )

    def _abort(self) -> None:
        """Forget the pass in progress after an error in backward (its end-of-pass callback will not
        run), so that the next forward/backward starts clean instead of mixing with stale uses."""
        if self.parallel is not None:
            self.parallel.reset_step()
        if self.adaptive is not None:
            self.adaptive.drop()
        if self._pass is not None and self._pass.acc_touched:
            self._acc.clear()
            self._acc_lost = "an error in a backward pass after part of the accumulated sums had been replaced"
        for tie in self.ties:
            tie.expected = 0
        self._factors = [None] * len(self.groups)
        self._drop_mask = None
        if self.perturb is not None:
            self.perturb.clear()
        self._drop_pass()

    def refuse_16bit_mean(self, module: nn.Module, g: Tensor, node: Any) -> None:
        """Refuse a use of ``module`` whose output gradient G passed through 16 bits in the backward of a scalar
        mean loss: G was rounded as fl16(g_i / B), and fl16 of g_i / B is not fl16(g_i) / B, so every row
        depends on the batch size B, which one sample changes (by up to 2^-8 of each row in bfloat16). The
        engine's multiplication by B comes after the rounding, too late: removing a sample would move the
        others' clipped gradients, and the step by more than R. Per-sample losses (the engine backpropagates
        sum_i l_i, no 1/B) and a sum loss round each row independently of the other samples.

        Checked at the first DP layer of the pass, before any per-sample work: G 16-bit (bfloat16 or float16
        autocast, a model in 16 bits, float16 with loss_scale), the use's forward under 16-bit autocast (its
        output may be float32 while later 16-bit operations round G: Embedding, norm layers on CUDA, taps),
        or 16-bit parameters or buffers in the model as make_private found them (`.to()` keeps the
        parameter objects; frozen 16-bit layers: their activations round G)."""
        if self.loss_reduction != "mean" or self._per_sample_losses:
            return
        amp = getattr(node, "autocast16", None)
        if g.dtype in _HALF:
            why = f"got {str(g.dtype).removeprefix('torch.')} output gradients"
        elif amp is not None:
            why = f"ran under 16-bit autocast ({str(amp).removeprefix('torch.')}), whose operations round them"
        elif self._pass is None and (half := [n for n, t in self._model_tensors if t.dtype in _HALF]):
            why = f"is in a model holding 16-bit tensors ({', '.join(half[:3])}), whose operations round them"
        else:
            return
        name = self._name_of.get(module, type(module).__name__)
        raise RuntimeError(
            f"DP layer {name!r} got the output gradients of a mean loss through 16 bits (it {why}): each row is "
            f"rounded as g_i / B, so one sample moves the others' clipped gradients (by up to 2^-8 of each: the "
            f"step's sensitivity would exceed R, more with a larger batch). The backward was stopped; no gradient "
            f"was written and no step counted. Give the (B,) per-sample losses to optimizer.backward(losses), e.g. "
            f"F.cross_entropy(out, y, reduction='none') (the engine backpropagates their sum: no 1/B), or use "
            f"make_private(..., loss_reduction='sum') with a summed loss"
        )

    def _on_backward(self, module: nn.Module, tie: Tie, saved: Any, g: Tensor, node: Any) -> None:
        if node is not None and self._strategy.sums and getattr(node, "_dp_counted", False):
            name = self._name_of.get(module, type(module).__name__)
            raise RuntimeError(
                f"DP layer {name!r} is in a second backward pass over one forward (l1.backward(retain_graph="
                f"True); l2.backward()): its samples were clipped and counted by the first, and would be again, "
                f"each then contributing up to 2R. Sum the losses and call backward once ((l1 + l2).backward()); "
                f"for micro-batches, run a forward per micro-batch (accumulation_steps)"
            )
        self.refuse_16bit_mean(module, g, node)
        if self._pass is None:
            self._begin_backward()
        assert self._pass is not None
        self._check_batch(module, g.shape[0], getattr(node, "model_batch", self.batch_size))
        for k, p in module._parameters.items():
            if p is not None and p.requires_grad and id(p) not in self._index:
                raise RuntimeError(
                    f"parameter {k!r} of DP layer {self._name_of.get(module, type(module).__name__)!r} is not one "
                    f"the engine was given (replaced by a new Parameter, or unfrozen, after make_private): its "
                    f"gradient would be neither clipped nor noised, nor written. Call make_private again on the "
                    f"model, with an optimizer holding the parameter"
                )
        if not all(p.requires_grad for p in tie.params):
            name = self._name_of.get(module, type(module).__name__)
            raise RuntimeError(
                f"a parameter of DP layer {name!r} was frozen after make_private: the engine clips and noises the "
                f"parameters it was given. Freeze parameters before make_private (call it again on the model "
                f"when the set of trainable parameters changes)."
            )
        if not self._strategy.takes_norms:  # the norms pass must have seen it (autograd.grad skips a reentrant
            late = not self._strategy.normed(tie) and g.shape[0] > 0  # checkpoint)
        else:
            late = tie.reported or any(self._pass.done[self._group_of[id(p)]] for p in tie.params)
        if late:
            name = self._name_of.get(module, type(module).__name__)
            raise RuntimeError(
                f"DP layer {name!r} sent its output gradient after its clipping group had been clipped, so its "
                f"per-sample norm would be left out: its forward ran inside the backward pass, as "
                f"torch.utils.checkpoint(..., use_reentrant=True) does. Use use_reentrant=False (Hugging Face: "
                f"model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{'use_reentrant': False}}))"
            )
        if node is not None and self._strategy.sums:
            node._dp_counted = True  # this forward's use is in a step now; a later pass over it is refused
        if g.shape[0] > 0:  # an empty (Poisson) batch has no per-sample work: its step is noise only
            tie.uses.setdefault(module, []).append((saved, g))
        tie.arrived += 1
        if tie.arrived >= tie.expected:
            self._tie_complete(tie)

    def _tie_complete(self, tie: Tie) -> None:
        if tie.reported:
            return
        tie.reported = True
        if not self._strategy.takes_norms:  # the clipping pass of two-pass: the factors are known
            self._check_same_norms(tie)
            self._sum_params(tie, tie.params)
            tie.uses.clear()
            return
        if self.perturb is not None:
            pruning.refuse_perturbed(tie.names, tie.modules)
        norms = (tie_norms(tie) if self.perturb is None else self.perturb.norms(self, tie)) if tie.uses else {}
        if tie.uses:
            self._strategy.took_norms(tie, norms)
        now = self._pass
        assert now is not None
        for gi in {self._group_of[id(p)] for p in tie.params}:
            # summed (and scaled) once, when the group closes: a non-finite one makes the sum non-finite
            now.norms[gi] += [norms[id(p)] for p in tie.params if self._group_of[id(p)] == gi and id(p) in norms]
            now.left[gi] -= 1
            if now.left[gi] == 0:
                self._group_done(gi)
        if not self._strategy.sums:
            tie.uses.clear()

    def _check_same_norms(self, tie: Tie) -> None:
        """two-pass: the clip factors come from the norms pass, the sums from the clipping pass's own backward, whose
        output gradients (and saved activations) a hook can change between the passes (a tensor hook scaling its
        gradient on its second call, a saved-tensors unpack hook): the clipped contribution c_i g_i would then
        exceed R. So the clipping pass takes each tie's certified norms again and requires, for every sample
        with c_i != 0, n2'_i <= (1 + 2^-16) n2_i per parameter (then c_i^2 sum_p ||g'_ip||^2 <= (1 + 2^-16) c_i^2
        sum_p n2_ip <= (1 + 2^-16) R^2, so c_i ||g'_i|| <= R (1 + 7.7e-6), within the R (1 + 1e-5) every norm
        is certified to; the float64 product errs by 2^-53 relative): a flag on the device, read with the pass's
        one host read, which refuses the step before any .grad is written. The slack is for a backend whose bound
        is not bitwise reproducible (CUDA's float64 index_add in the reference Embedding bound adds in any
        order), where two certified bounds of the same exact norm may differ in their last bits: an exact
        comparison would refuse steps at random. Costs one more norms computation per layer in the clipping
        pass."""
        first = self._strategy.norms_taken(tie)
        if not tie.uses or self.perturb is not None or first is None:
            return
        again = tie_norms(tie)
        flags = []
        for p in tie.params:
            c = self._factors[self._group_of[id(p)]]
            if id(p) not in first or id(p) not in again or c is None:
                continue
            flags.append(((again[id(p)] <= first[id(p)] * _SAME_NORMS_SLACK) | (c == 0)).all())
        if not flags:
            return
        flag = flags[0] if len(flags) == 1 else torch.stack(flags).all()
        names = list(tie.names)

        def refuse() -> None:
            raise RuntimeError(
                f"strategy='two-pass': the clipping pass's per-sample gradients of {names} exceed the norms the "
                f"norms pass clipped them by (a tensor hook, autograd Function or saved-tensors hook gave the second "
                f"backward other output gradients or activations): the step is refused, no .grad was written. "
                f"Make such hooks return the same gradient on each call, or use strategy='bk'"
            )

        self.deferred_checks.append((flag, refuse))

    def _group_norms(self, gi: int) -> Tensor:
        """The per-sample squared norms of group ``gi`` in loss units: sum_p n2_p * loss_scale^2 over the
        norms its ties sent (zeros when no sample reached the group)."""
        assert self._pass is not None
        parts = self._pass.norms[gi]
        if not parts:
            return torch.zeros(self._batch or 0, device=self._params[0].device, dtype=torch.float64)
        if len(parts) == 1:
            total = parts[0]
        elif len(parts) == 2:  # a Linear's weight and bias: one add, no stack
            total = parts[0] + parts[1]
        else:
            total = torch.stack(parts).sum(0)
        return total * _sum_cover(self.loss_scale(), len(parts))

    def _group_done(self, gi: int) -> None:
        now = self._pass
        assert now is not None
        if now.done[gi]:
            return
        now.done[gi] = True
        n2 = self._group_norms(gi)
        c = factors_in(
            clip_factors(n2.sqrt(), self.bounds[gi], self.clipping, self.gamma),
            self.loss_scale(),
            self._factor_dtype[gi],
        )
        mask = sample_mask(self._sample_mask, c) if self._sample_mask is not None else None
        if mask is not None:
            c = c * mask
        if self.nonfinite == "drop":
            c, dropped = drop_nonfinite(n2, c)
            if mask is not None:
                dropped = dropped & mask.bool()  # a padding row is not a sample
            self._drop_mask = dropped if self._drop_mask is None else self._drop_mask | dropped
        else:
            now.closed.append(n2)  # checked finite with the pass's one host read (_check_finite)
        self._factors[gi] = c
        if self.adaptive is not None:
            self.adaptive.observe(gi, n2, self.bounds[gi])
        if not self._strategy.sums:
            return
        for tie in self._ties_of_group[gi]:
            if tie.reported and tie.uses:
                ps = [p for p in tie.params if self._group_of[id(p)] == gi]
                self._sum_params(tie, ps)
                if len(tie.summed) == len(tie.params):
                    tie.uses.clear()

    def _spec(self, p: nn.Parameter, fin: bool, prev: Tensor | None) -> SumSpec:
        c = self._factors[self._group_of[id(p)]]
        assert c is not None
        noise_std, scale = self.noise.fused(fin)
        return SumSpec(c=c, prev=prev, noise_std=noise_std, scale=scale, seed=self.param_seed(p))

    def _prev(self, p: nn.Parameter) -> Tensor | None:
        """The raw sum of earlier micro-batches; kept until the commit when results are staged."""
        if self._stage or id(p) not in self._acc:
            return self._acc.get(id(p))
        assert self._pass is not None
        self._pass.acc_touched = True
        return self._acc.pop(id(p))

    def _store(self, p: nn.Parameter, result: Tensor, last: bool) -> None:
        assert self._pass is not None
        if last:
            if self.secure is not None:
                result = self._final_noise(p, result)
            final = result.to(p.dtype)
            self._pass.staged.append((p, final, True))
            if self.parallel is not None:  # data-parallel: its bucket's all-reduce may start now, during backward
                self.parallel.final(self._params, p, final, sum(t.expected > 0 and not t.reported for t in self.ties))
        elif self._stage:
            self._pass.staged.append((p, result, False))
        else:
            self._pass.acc_touched = True
            self._commit(p, result, False)

    def _commit(self, p: nn.Parameter, result: Tensor, last: bool) -> None:
        if last:
            self._write_grad(p, result)
            self._noised.add(id(p))
            self._acc.pop(id(p), None)
        else:
            self._acc[id(p)] = result

    def _sum_params(self, tie: Tie, params: list[nn.Parameter]) -> None:
        """Clipped sums of ``params`` from the tie's uses; noise fused when this is the last micro-batch.

        Parameters of one module go in one call; a parameter shared by several modules
        chains their contributions through ``prev`` and gets its noise once, in the last.
        """
        last = self._micro + 1 == self.accumulation_steps
        if self.perturb is not None:
            self.perturb.sum_params(self, tie, params, last)
            return
        by_module: dict[nn.Module, list[nn.Parameter]] = {}
        for p in params:
            tie.summed.add(id(p))
            owners = [m for m in tie.owners(p) if tie.uses.get(m)]
            if self._factors[self._group_of[id(p)]] is None or not owners:
                continue
            if len(owners) == 1:
                by_module.setdefault(owners[0], []).append(p)
                continue
            result = self._prev(p)
            for k, m in enumerate(owners):
                spec = self._spec(p, last and k == len(owners) - 1, result)
                result = dp_function(m).clipped_sum(m, tie.uses[m], {id(p): spec})[id(p)]
            assert result is not None
            self._store(p, result, last)
        for m, ps in by_module.items():
            specs = {id(p): self._spec(p, last, self._prev(p)) for p in ps}
            out = dp_function(m).clipped_sum(m, tie.uses[m], specs)
            for p in ps:
                self._store(p, out[id(p)], last)

    def _end_backward(self) -> None:
        """End of a backward pass: finish what is still open, then reset the per-pass state."""
        try:
            with ids_looked_up(), self._canonical():
                self._finish_pass()
        except BaseException:
            self._abort()
            raise

    def _finish_pass(self) -> None:
        for tie in self.ties:
            if tie.expected > 0 and not tie.reported:
                self._tie_complete(tie)
        if self._strategy.takes_norms:
            for gi in range(len(self.groups)):
                self._group_done(gi)
        self._check_finite()
        assert self._pass is not None
        for p, result, last in self._pass.staged:
            self._commit(p, result, last)
        if self.adaptive is not None and self._strategy.sums:
            self.adaptive.commit(self._params[0].device)
        if self._strategy.sums:
            for tie in self.ties:
                tie.expected = 0
            self._micro += 1
            self._factors = [None] * len(self.groups)  # the batch's clip factors: secret, and used up
            if self._drop_mask is not None:  # the samples dropped from the sums just committed
                n = self._drop_mask.sum()
                self._dropped = n if self._dropped is None else self._dropped + n
                self._drop_mask = None
            if self.perturb is not None:
                self.perturb.clear()
        self._drop_pass()

    def _check_finite(self) -> None:
        """The pass's one host read: every per-sample norm finite, or an error before any .grad is written.

        Each group's summed squared norms are non-finite exactly when a term is (norms are >= 0), so one
        flag per group, and-ed on the device, replaces a read per parameter (149 on GPT-2-small)."""
        # A guard's hash of a forward (dpkernels.guard) is due at the end of that forward's backward pass (of
        # two-pass's clipping pass, whose backward runs the forward's hooks again); the others at once.
        due = [
            isinstance(f, Tensor) or (self._strategy.sums and getattr(f, "reached", None) is not False)
            for f, _ in self.deferred_checks
        ]
        pending = [e for e, d in zip(self.deferred_checks, due, strict=True) if d]
        self.deferred_checks[:] = [e for e, d in zip(self.deferred_checks, due, strict=True) if not d]
        assert self._pass is not None
        closed = self._pass.closed
        finite = None
        if closed:  # one flag for every closed group: (G, B) squared norms, all finite
            finite = torch.isfinite(closed[0] if len(closed) == 1 else torch.stack(closed)).all()
        ok = finite
        for entry, _ in pending:
            flag = entry if isinstance(entry, Tensor) else entry()
            if flag is not None:
                ok = flag if ok is None else ok & flag
        if ok is None or bool(ok):
            return
        for _, check in pending:
            check()
        if finite is None or bool(finite):
            return
        bad: set[int] = set()
        names: list[str] = []
        for gi, parts in enumerate(self._pass.norms):
            for n2 in parts:
                if not bool(torch.isfinite(n2).all()):
                    bad.update((~torch.isfinite(n2)).nonzero().flatten().tolist())
                    names += [self._name_of[m] for t in self._ties_of_group[gi] for m in t.modules]
        raise FloatingPointError(
            f"non-finite per-sample gradient in the clipping group(s) of {sorted(set(names))[:8]} for sample(s) "
            f"{sorted(bad)[:8]}: no step was taken; check the loss and inputs of those samples. Whether a step "
            f"fails depends on single samples, which an adversary can see: make_private(..., nonfinite='drop') "
            f"gives such a sample clip factor 0 and steps as usual (DP-safe)"
        )

    def dropped_samples(self) -> int:
        """How many samples nonfinite="drop" left out of the clipped sums since make_private (a sample counts
        once per micro-batch however many of its clipping groups it was dropped from; padding rows never).

        A host read of a device counter: nothing reads it unless this is called. The number is private to the
        trainer: it depends on the data (one adversarial sample moves it by 1), so releasing it, or acting on
        it in a way that shows (stopping the run when it moves), is not covered by the DP guarantee; use it to
        notice a diverging run or bad data. Always 0 with nonfinite="raise"."""
        return 0 if self._dropped is None else int(self._dropped)

    def backward(self, loss: Tensor, sample_mask: Tensor | None = None) -> None:
        """One micro-batch's backward; for "two-pass" the norms pass and then the clipping pass.

        ``sample_mask``: (B,) bool, False on padding rows (dpkernels.padding): their clip factors are 0.

        ``loss`` is the scalar the loss_reduction says (the mean or the sum of the per-sample losses),
        or the (B,) per-sample losses l_i themselves: then the engine backpropagates sum_i l_i, so each
        G row is exactly sample i's, whatever scaling a hand-written reduction would have got wrong (a
        sum under loss_reduction="mean" lets one sample move the step by ~B/E times too much)."""
        self.check_live()
        if sample_mask is not None:
            if self.adaptive is not None:
                raise ValueError(
                    "sample_mask (padded batches) is not supported with adaptive clipping yet: its private count of "
                    "samples under the bound would count the padding rows. Leave pad_to unset with adaptive clipping"
                )
            self._sample_mask = padding.loader_mask(sample_mask, self.deferred_checks)
            try:
                self.backward(loss)
            finally:
                self._sample_mask = None
            return
        if loss.dim() == 1:
            B = self.batch_size
            if B is not None and loss.shape[0] != B:
                raise ValueError(
                    f"optimizer.backward got {loss.shape[0]} per-sample losses for a batch of {B} samples: give "
                    f"one loss per sample (shape ({B},)), or the reduced scalar loss"
                )
            self._per_sample_losses = True
            try:
                self.backward(loss.sum())
            finally:
                self._per_sample_losses = False
            return
        self._strategy.run(self, loss)

    # ------------------------------------------------------------------ step
    def covers(self, p: Tensor) -> bool:
        """Whether ``p`` is one of the parameters this engine clips and noises."""
        return id(p) in self._index

    def param_seed(self, p: nn.Parameter) -> int:
        return self.noise.seed_of(self._index[id(p)])

    def _final_noise(self, p: nn.Parameter, prev: Tensor | None) -> Tensor:
        """scale * (prev + rank_noise_std * z) for ``p`` (`NoisePlan.noised`); pruned coordinates: no noise,
        as in the fused epilogues."""
        m, k = self._owner_of[id(p)]
        return pruning.masked_grad(m, k, self.noise.noised(prev, self._index[id(p)], p))

    def rank_noise_std(self) -> float:
        """sigma R_total / sqrt(world): each rank's share of the noise (`NoisePlan.rank_std`)."""
        return self.noise.rank_std()

    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the final gradient."""
        return self.noise.std()

    def finish_step(self) -> None:
        """Give every parameter not yet noised its noise (and scale); then start a new logical step."""
        self.check_live()
        for flag, _ in self.deferred_checks:  # hashed before the step writes the parameters (read later)
            if not isinstance(flag, Tensor):
                flag()
        if self._acc_lost is not None:
            why, self._acc_lost = self._acc_lost, None
            self._acc.clear()
            if self.adaptive is not None:
                self.adaptive.clear()
            self._noised.clear()
            self._micro = 0
            raise RuntimeError(
                f"no step was taken: the micro-batches accumulated for it were lost ({why}); "
                f"call optimizer.zero_grad() and run the step's micro-batches again"
            )
        for p in self._params:
            if id(p) not in self._noised:
                self._write_grad(p, self._final_noise(p, self._acc.pop(id(p), None)).to(p.dtype))
        self._acc.clear()
        self._noised.clear()
        self._micro = 0
        if self.adaptive is not None:  # the noisy counts, keyed like a parameter's noise (index past the last)
            self.adaptive.release(self, self.noise.count_seed(len(self._params)))
        self.steps += 1
        self.noise.next_step()

    def abandon_step(self) -> None:
        """Drop the logical step in progress (a refused step): its micro-batches' sums and the gradients
        already written, so that the next backward starts a new step and no half-made gradient is stepped.
        Noise already in a .grad was readable (GradScaler's unscale_ reads it): the step counter, which keys
        the noise streams, moves on, or the next step's update minus this one would cancel their noise."""
        if self._noised:
            self.steps += 1
            self.noise.next_step()
        self._abort()
        self._acc.clear()
        self._noised.clear()
        self._micro = 0
        self._acc_lost = None
        if self.sharding is not None:
            self.sharding.pending.clear()
        for p in self._params:
            p.grad = None

    def report(self) -> str:
        """Per layer: type, norm method chosen at the last backward, clipping group."""
        rows = ["layer | type | norm method | group"]
        for name, m in self.modules.items():
            gis = sorted({self._group_of[id(p)] for p in self._tie_of[m].params if id(p) in self._group_of})
            method = getattr(m, "dp_norm_method", "-")
            rows.append(f"{name} | {type(m).__name__} | {method} | {','.join(map(str, gis))}")
        return "\n".join(rows)


_HALF = (torch.bfloat16, torch.float16)


def _round_down(x: float, margin: float) -> float:
    """A float <= x * (1 - margin) exactly (host arithmetic: checked in rationals, one ulp down if needed)."""
    m = x * (1.0 - margin)
    if Fraction(m) > Fraction(x) * (1 - Fraction(margin)):
        m = math.nextafter(m, 0.0)
    return m


def _sum_cover(loss_scale: float, k: int) -> float:
    """A float m >= s^2 (1 + 2 k u), u = 2^-53, s = loss_scale: fl(fl(sum of k float64 terms >= 0) * m) is
    then >= s^2 times their exact sum (the sum loses at most a factor 1 - gamma_{k-1}, the product 1 - u,
    and (1 + 2 k u)(1 - gamma_{k-1})(1 - u) >= 1): the group's squared norm stays an upper bound."""
    exact = Fraction(loss_scale) ** 2 * (1 + Fraction(2 * k, 2**53))
    m = float(exact)
    return m if Fraction(m) >= exact else math.nextafter(m, math.inf)


def factors_in(c: Tensor, multiplier: float, dtype: torch.dtype) -> Tensor:
    """multiplier * c in ``dtype``, never above the exact product (the layers then read the factors as
    they are, with no rounding to nearest of their own).

    float64: fl(c m) with m <= multiplier (1 - 2^-52) is <= c m (1 + 2^-53) <= c multiplier for a normal
    result; a subnormal one is 0.
    float32: fl32(fl64(c m)) with m <= multiplier (1 - 2^-52)(1 - 2^-23) is <= c m (1 + 2^-53)(1 + 2^-24)
    <= c multiplier for a float32 normal result; values below the smallest normal float32 (whose
    rounding is absolute, not relative) are set to 0 (the sample dropped, never a factor rounded up).
    Values past the dtype's largest finite one (automatic clipping's R / gamma for a zero gradient, times
    B / S) are that largest value, below the exact product: an inf factor would make the zero rows of its
    sample inf * 0 = NaN in everyone's sum."""
    if c.dtype != torch.float64:
        c = c.to(torch.float64)  # exact
    if dtype == torch.float64:
        f64 = torch.finfo(torch.float64)
        return torch.threshold(c * _round_down(multiplier, 2.0**-52), f64.tiny, 0.0).clamp_max_(f64.max)
    m = _round_down(_round_down(multiplier, 2.0**-52), 2.0**-23)
    c = torch.threshold(c * m, torch.finfo(torch.float32).tiny, 0.0).clamp_max_(torch.finfo(torch.float32).max)
    return c.to(dtype)


_SAME_NORMS_SLACK = 1.0 + 2.0**-16  # two-pass's clipping pass vs its norms pass: Engine._check_same_norms


def drop_nonfinite(n2: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """nonfinite="drop": (c with c_i = 0 where the group's squared norm n2_i is not finite, that (B,) mask),
    on the device with no host read.

    Why this is DP: every clipped-sum op adds exactly 0 for a sample with c_i = 0, whatever its rows hold
    (dpkernels.ops: a select, not 0 * inf = NaN), so the released sum with sample i dropped is the sum over the
    batch without it, the neighbouring dataset's under add/remove; the step, its noise and its accounting are
    those of that batch, and whether the step happens no longer depends on one sample. Other clipping groups keep
    their own factors (a sample finite there adds c_i^g g_i^g with the usual bound R_g). With adaptive clipping
    such a sample's count term is that of a norm above the bound (NaN <= R is false): -1/2, within the count's
    sensitivity of 1/2."""
    finite = torch.isfinite(n2)
    return torch.where(finite, c, torch.zeros((), dtype=c.dtype, device=c.device)), ~finite


def sample_mask(mask: Tensor, c: Tensor) -> Tensor:
    """``mask`` as 0 / 1 in ``c``'s dtype and device, after checking its shape against the clip factors'
    (shapes only: no host read of the mask)."""
    if mask.dtype != torch.bool or mask.shape != c.shape:
        raise ValueError(
            f"sample_mask must be a bool tensor of shape ({c.shape[0]},), one entry per row of the batch the model "
            f"saw (False on padding rows), got {mask.dtype} of shape {tuple(mask.shape)}: pass the mask that "
            f"poisson_loader(..., pad_to=...) yields with the batch"
        )
    return mask.to(device=c.device, dtype=c.dtype)


def tie_norms(tie: Tie) -> dict[int, Tensor]:
    """Per-sample squared norms of a tie's parameters (keyed by id), exact for shared parameters."""
    if len(tie.modules) == 1:
        m = tie.modules[0]
        return dp_function(m).norms(m, tie.uses.get(m, []))
    from .functional.tied import tied_norms

    pruning.refuse_tied(tie.names, tie.modules)
    return tied_norms(tie)
