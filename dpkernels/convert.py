"""make_private: swap supported layers for their DP twins, validate the rest, wire the engine."""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import ops
from .accounting import Accountant, get_noise_multiplier
from .clipping import CLIP_FUNCTIONS, GroupSpec, group_bounds, resolve_groups
from .engine import _COPIED, DetachedEngine, Engine, Tie, attached_engine
from .fsdp import ShardedParams, check_module, fsdp_modules, is_fsdp2
from .guard import ForwardGuard
from .nn import DP_LAYERS, DPModule
from .nn.tap import tap_known
from .optimizer import DPOptimizer, optimizer_params
from .secure import check_seed

_SUPPORTED = (
    "Linear, Conv1d/2d/3d, Embedding, LayerNorm, RMSNorm, GroupNorm, MultiheadAttention, RNN, LSTM, GRU, "
    "Hugging Face Conv1D and LlamaRMSNorm; a raw (1, ...) parameter the model only broadcasts over the batch: "
    "dpkernels.tap_parameters"
)


# --- optional third-party layers (transformers, ...): looked up by qualified class name, so that the
# package is never imported by dpkernels; the twin's module is imported when such a layer is met. A
# target is a DP class, or a function (layer class -> DP class, or None to refuse).
_HF = "transformers.models"
THIRD_PARTY_LAYERS: dict[str, str] = {
    "transformers.pytorch_utils.Conv1D": "dpkernels.nn.hf:DPConv1D",
    f"{_HF}.llama.modeling_llama.LlamaRMSNorm": "dpkernels.nn.hf:DPLlamaRMSNorm",
    **{
        f"{_HF}.{m}.modeling_{m}.{c}": "dpkernels.nn.hf:llama_style_rmsnorm"  # LlamaRMSNorm's code, checked on use
        for m, c in [
            ("mistral", "MistralRMSNorm"),
            ("mixtral", "MixtralRMSNorm"),
            ("qwen2", "Qwen2RMSNorm"),
            ("qwen2_moe", "Qwen2MoeRMSNorm"),
            ("qwen3", "Qwen3RMSNorm"),
            ("phi3", "Phi3RMSNorm"),
            ("granite", "GraniteRMSNorm"),
            ("smollm3", "SmolLM3RMSNorm"),
        ]
    },
}


def dp_class(m: nn.Module) -> type[DPModule] | None:
    """The DP twin of ``m``'s exact type: DP_LAYERS, then THIRD_PARTY_LAYERS; None if unsupported."""
    cls = DP_LAYERS.get(type(m))
    if cls is None:
        target = THIRD_PARTY_LAYERS.get(f"{type(m).__module__}.{type(m).__qualname__}")
        if target is not None:
            mod, attr = target.split(":")
            obj = getattr(importlib.import_module(mod), attr)
            cls = obj if isinstance(obj, type) else obj(type(m))
    return cls


# --- end of third-party layers


def convert_layers(model: nn.Module, in_place: bool = False) -> nn.Module:
    """Replace every supported torch layer (exact type) by its DP twin, in place; returns the model.
    A model that is itself such a layer becomes its twin in place (the same object, as from_module does
    with a copy), so a reference the caller kept stays the converted model.

    Modules listed in nn.tap.TAPPED_PARAMETERS (the model itself included) keep their class's code but
    get exact per-sample gradients for their batch-broadcast raw parameters (see dpkernels.nn.tap).
    ``in_place``: every layer becomes its twin in place (FSDP2 keeps references to the layers it shards)."""
    root = dp_class(model)
    if root is not None:
        return root.from_module(model, in_place=True)
    tap_known(model)
    for name, child in list(model.named_children()):
        dp_cls = dp_class(child)
        if dp_cls is not None:
            setattr(model, name, dp_cls.from_module(child, in_place=in_place))
        else:
            convert_layers(child, in_place)
    return model


def _trainable(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters(recurse=False) if p.requires_grad]


_SEQUENCE_FIRST = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder)
_SEQUENCE_FIRST_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _batch_first(m: nn.Module) -> bool:
    if isinstance(m, nn.Transformer):
        return bool(m.batch_first)
    if isinstance(m, nn.TransformerEncoder | nn.TransformerDecoder):
        return all(_batch_first(layer) for layer in m.layers)
    return bool(m.self_attn.batch_first)  # type: ignore[union-attr]


def _reparametrised(m: nn.Module) -> tuple[str, list[str]] | None:
    """How ``m``'s parameters are reparametrised, and the trainable ones that are, or None."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    if parametrize.is_parametrized(m):
        plists: nn.ModuleDict = m.parametrizations  # type: ignore[assignment]
        ps = [f"parametrizations.{n}" for n, p in plists.named_parameters() if p.requires_grad]
        kinds = ", ".join(f"{k}: {type(q).__name__}" for k, pl in plists.items() for q in pl)  # type: ignore[attr-defined]
        fix = f"torch.nn.utils.parametrize.remove_parametrizations(module, {next(iter(plists))!r})"
        return (f"torch.nn.utils.parametrize ({kinds}); remove it ({fix})", ps) if ps or _trainable(m) else None
    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm | WeightNorm):
            spectral = isinstance(hook, SpectralNorm)
            names = [f"{hook.name}_orig"] if spectral else [f"{hook.name}_g", f"{hook.name}_v"]
            ps = [n for n in names if getattr(m, n).requires_grad]
            how, undo = ("spectral_norm", "remove_spectral_norm") if spectral else ("weight_norm", "remove_weight_norm")
            how = f"torch.nn.utils.{how} on {hook.name!r}; remove it (torch.nn.utils.{undo}(module))"
            return (how, ps) if ps else None
    return None


def _refusal(m: nn.Module, in_fake_quant: bool) -> str | None:
    """Why ``m`` cannot be made private as it stands (what validate refuses besides BatchNorm and DDP), or None.
    ``in_fake_quant``: ``m`` is inside a FakeQuantize, which runs it only while its observer is enabled."""
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase

    trainable = any(p.requires_grad for p in m.parameters())
    if isinstance(m, _SEQUENCE_FIRST + _SEQUENCE_FIRST_LAYERS) and trainable and not _batch_first(m):
        return (
            "has batch_first=False: it takes (T, B, d) inputs, and its Linear and LayerNorm layers would take the "
            "sequence dimension for the batch and clip per position (silently when T equals the batch size). Build "
            "it with batch_first=True and feed it (B, T, d)"
        )
    rep = _reparametrised(m)
    if rep is not None:
        how, ps = rep
        return (
            f"has parameters reparametrised by {how}, or freeze {ps or 'its parameters'}: the DP layer's gradient "
            f"is that of the computed weight, and the per-sample gradients of the parameters the optimizer steps "
            f"are a different function of it, whose norms it does not compute"
        )
    observer = isinstance(m, ObserverBase) and not in_fake_quant
    if observer or (isinstance(m, FakeQuantizeBase) and bool(m.observer_enabled[0])):
        return (
            "records statistics of its inputs (min/max) into its buffers in every training forward: they would be "
            "learned from the batch without clipping or noise, and released with the model. Calibrate on public "
            "data, then disable the observers before make_private (model.apply(torch.ao.quantization."
            "disable_observer)) or remove them"
        )
    return None


def validate(model: nn.Module, sharded: bool = False) -> dict[str, nn.Module]:  # values are DPModules
    """The DP modules with trainable parameters, by name; raises on what cannot be made private.
    ``sharded``: FSDP2 (fully_shard) modules are accepted as containers (make_private(distributed=True))."""
    from torch.ao.quantization import FakeQuantizeBase

    fqs = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    in_fake_quant = {id(c) for fq in fqs for c in fq.modules() if c is not fq}
    for name, m in model.named_modules():
        parallel = isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel))
        fsdp = type(m).__module__.startswith("torch.distributed.fsdp")
        if fsdp and sharded and is_fsdp2(m):
            check_module(name, m)
        elif fsdp:
            raise ValueError(
                f"module {name or '<model>'!r} is a {type(m).__name__} (FSDP2's fully_shard): make_private needs "
                f"distributed=True for a sharded model, so that the ranks' clipped sums are reduce-scattered to the "
                f"shards. Call fully_shard first, build the optimizer, then make_private(..., distributed=True) on "
                f"every rank; the legacy FullyShardedDataParallel wrapper is not supported"
            )
        elif parallel:
            raise ValueError(
                f"module {name or '<model>'!r} is a {type(m).__name__}: data-parallel training is not supported. "
                f"The engine writes each parameter's private gradient at the end of backward, outside the "
                f"wrapper's gradient all-reduce, which would then overwrite or miss it (with one process "
                f"DistributedDataParallel left every gradient zero). Call make_private on the unwrapped "
                f"model, with distributed=True for data-parallel training on torch.distributed "
                f"(one process per device: DataParallel's threads are not supported)."
            )
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"module {name!r} is a {type(m).__name__}: batch statistics mix samples, so per-sample "
                f"gradients are not defined. Replace it with GroupNorm (e.g. nn.GroupNorm(32, channels), or "
                f"torchvision's norm_layer=lambda c: nn.GroupNorm(32, c))."
            )
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            raise ValueError(
                f"module {name!r} is a {type(m).__name__} with track_running_stats=True: its running mean and "
                f"variance are averages of the training batches, updated without noise and kept in the model's "
                f"state. Build it with track_running_stats=False (each sample is normalised by its own statistics)."
            )
        reason = _refusal(m, id(m) in in_fake_quant)
        if reason is not None:
            raise ValueError(f"module {name or '<model>'!r} ({type(m).__name__}) {reason}")
    dp: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if isinstance(m, DPModule) and _trainable(m)}
    covered = {id(p) for m in dp.values() for p in _trainable(m)}
    owner = {id(p): n for n, m in model.named_modules() for p in m.parameters(recurse=False)}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad and id(p) not in covered:
            mname = owner.get(id(p), "")
            mod = model.get_submodule(mname) if mname else model
            raise ValueError(
                f"parameter {pname!r} of module {mname or '<model>'!r} ({type(mod).__name__}) is trainable but no "
                f"DP layer covers it, so its gradient would not be private. Freeze it "
                f"(p.requires_grad_(False)) or build the module from supported layers ({_SUPPORTED})."
            )
    return dp


def check_optimizer(optimizer: torch.optim.Optimizer, covered: set[int], model: nn.Module) -> None:
    """Every trainable parameter the optimizer steps must be one the engine makes private."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for where, p in optimizer_params(optimizer):
        if p.requires_grad and id(p) not in covered:
            what = repr(names[id(p)]) if id(p) in names else f"{where} (not in the model)"
            raise ValueError(
                f"the optimizer steps parameter {what} of shape {tuple(p.shape)}, which no DP layer of the model "
                f"covers, so its gradient would not be private. Remove it from the optimizer, freeze it "
                f"(p.requires_grad_(False)), or make it a parameter of the model's DP layers."
            )


def build_ties(modules: dict[str, nn.Module]) -> list[Tie]:
    """Group DP modules that share a trainable parameter (union-find); check each group is supported."""
    parent = {n: n for n in modules}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    first: dict[int, str] = {}
    for n, m in modules.items():
        for p in _trainable(m):
            if id(p) in first:
                parent[find(n)] = find(first[id(p)])
            else:
                first[id(p)] = n
    by_root: dict[str, list[str]] = {}
    for n in modules:
        by_root.setdefault(find(n), []).append(n)
    ties = []
    for names in by_root.values():
        mods = [modules[n] for n in names]
        params: list[nn.Parameter] = []
        for m in mods:
            for p in _trainable(m):
                if all(q is not p for q in params):
                    params.append(p)
        if len(mods) > 1:
            from .functional.tied import check_tie

            check_tie(mods, names)
        ties.append(Tie(modules=mods, names=names, params=params))
    return ties


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    max_grad_norm: float | Sequence[float] = 1.0,
    expected_batch_size: float | None = None,
    sample_rate: float | None = None,
    dataset_size: int | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    clipping: str = "abadi",
    gamma: float = 0.01,
    groups: GroupSpec = "all-layer",
    strategy: str = "bk",
    loss_reduction: str = "mean",
    accumulation_steps: int = 1,
    accountant: str = "rdp",
    seed: int | None = None,
    secure_mode: bool = False,
    backend: str | None = None,
    distributed: bool | object = False,
    loss_scale: float = 1.0,
    perturb_k: float = 0.0,
    adaptive_clipping: Any = None,
    nonfinite: str = "raise",
) -> tuple[nn.Module, DPOptimizer]:
    """Make ``model`` and ``optimizer`` train with DP-SGD.

    Each step's gradient is (sum_i c_i g_i + N(0, sigma^2 R_total^2)) / expected_batch_size
    (no division for loss_reduction="sum"), with c_i the clip factors of each clipping group.

    Give either ``noise_multiplier`` or ``target_epsilon`` (with ``target_delta`` and the number
    of ``steps`` or ``epochs``). The sampling rate is ``sample_rate``, or
    expected_batch_size / dataset_size; without it no privacy is accounted.

    ``distributed``: True (the default process group) or a process group trains data-parallel on
    torch.distributed: call make_private with the same arguments on every rank, with the *global*
    expected batch size / sample rate / dataset size; each rank clips its own samples, the noised
    sums are all-reduced at ``step()`` and the noise is added once (see dpkernels.distributed).

    ``loss_scale`` S: the backward runs on S * loss (a fixed loss scale for float16 training, where small
    gradients would underflow: ``optimizer.backward(S * losses)`` with the (B,) per-sample losses, as a
    scalar mean loss in 16 bits is refused, or a summed loss with ``loss_reduction="sum"``); the engine
    divides the output gradients it sees by S before taking norms and clipped sums, so R bounds the
    unscaled per-sample gradients and the noise is unchanged.
    torch.amp.GradScaler (a scale that changes with the data) is refused at the step.

    ``perturb_k`` k > 0: perturbed clipping (Chen, Wu & Hong 2020; dpkernels.perturb): each sample's
    contribution to a clipping group is c_i (g_i + k zeta_i), zeta_i ~ N(0, I) over the group's parameters
    and c_i the clip factor of ||g_i + k zeta_i|| (certified), so that the same zeta_i enters the norm and
    the sum. ||c_i (g_i + k zeta_i)|| <= R_g still holds for every sample: the sensitivity, the noise and
    the privacy account are those of plain clipping. It removes most of the clipping bias of asymmetric
    per-sample gradient distributions at the cost of variance k^2 per coordinate and sample. It runs on
    the reference ops (per-sample instantiation, B layer calls per pass) whatever the backend.
    k = 0 (the default) is plain clipping.

    ``adaptive_clipping``: a `dpkernels.adaptive.AdaptiveClipping` or a dict of its fields (count_noise_multiplier,
    target_quantile, lr): each group's bound starts at its ``max_grad_norm`` share and follows the target quantile
    of its per-sample norms, from privately counted clip fractions; noise_multiplier (or the one target_epsilon
    calibrates) stays the accounted sigma and the gradient gets (sigma^-2 - G (2 sigma_b)^-2)^-1/2 (see
    dpkernels.adaptive). ``optimizer.max_grad_norm`` gives the bounds as they are now.

    ``secure_mode``: the noise from ChaCha20 keyed by the operating system's entropy, sampled in float64 by a
    method that resists the known floating-point attacks, on every backend (dpkernels.secure); ``seed`` refused.

    ``nonfinite``: what a sample whose per-sample gradient is non-finite (inf or NaN in its loss, input or any
    layer's output gradient) does. "raise" (the default): the backward raises FloatingPointError naming the
    samples and layers, no gradient is written and no step counted; clear, but whether the step happens then
    depends on one sample, so an adversary whose sample overflows learns from the failed step whether it was
    drawn. "drop": that sample gets clip factor 0 in each clipping group where its squared norm is not finite
    (decided on the device, no host read) and adds exactly 0 to every clipped sum; the step goes on and is
    accounted as usual. This is DP: the released sum with the sample dropped is the sum without it, the
    neighbouring dataset's. ``optimizer.engine.dropped_samples()`` counts them (a host read, only when asked).
    """
    if clipping not in CLIP_FUNCTIONS:
        raise ValueError(f"clipping must be one of {CLIP_FUNCTIONS}, got {clipping!r}")
    check_seed(secure_mode, seed)
    if not (gamma > 0 and math.isfinite(gamma)):  # c_i = R / (n_i + gamma) is bounded by R only for gamma > 0
        raise ValueError(f"gamma must be a finite number > 0 (automatic clipping divides by n_i + gamma), got {gamma}")
    if not (loss_scale > 0 and math.isfinite(loss_scale)):
        raise ValueError(f"loss_scale must be a finite number > 0 (the engine divides by it), got {loss_scale}")
    if sample_rate is None and dataset_size is not None and expected_batch_size is not None:
        sample_rate = expected_batch_size / dataset_size
    if expected_batch_size is None:
        if sample_rate is None or dataset_size is None:
            raise ValueError("give expected_batch_size (the expected number of samples in a logical step)")
        expected_batch_size = sample_rate * dataset_size
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon")
    previous, spent = _run_so_far(model, sample_rate)
    if target_epsilon is not None:
        if target_delta is None or sample_rate is None:
            raise ValueError("target_epsilon needs target_delta and the sampling rate (sample_rate or dataset_size)")
        if steps is None:
            if epochs is None:
                raise ValueError("target_epsilon needs the number of steps (steps=...) or epochs (epochs=...)")
            steps = math.ceil(epochs / sample_rate)
        noise_multiplier = get_noise_multiplier(
            target_epsilon, target_delta, sample_rate, steps, accountant, spent=spent
        )
    assert noise_multiplier is not None
    if isinstance(optimizer, DPOptimizer):
        raise ValueError(
            "the optimizer is already a DPOptimizer: pass the optimizer it wraps (dp_optimizer.original_optimizer), "
            "or two engines would each noise the same parameters"
        )
    if backend is not None:
        ops.set_backend(backend)

    sharded = distributed is not False and bool(fsdp_modules(model))  # FSDP2: see dpkernels.fsdp
    if sharded and perturb_k:
        raise ValueError(
            "perturb_k with a model sharded by fully_shard is not supported: perturbed clipping instantiates "
            "per-sample gradients from the layers' weights, which FSDP holds as shards. Use perturb_k=0"
        )
    convert_layers(model, in_place=sharded)
    modules = validate(model, sharded=sharded)
    if not modules:
        raise ValueError("the model has no trainable parameters in a DP layer: nothing to train privately")
    ties = build_ties(modules)
    params = {n: _trainable(m) for n, m in modules.items()}
    clip_groups = resolve_groups(modules, params, groups)
    check_optimizer(optimizer, {id(p) for ps in clip_groups for p in ps}, model)
    bounds = group_bounds(max_grad_norm, len(clip_groups))
    engine = Engine(
        modules,
        ties,
        clip_groups,
        bounds,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        clipping=clipping,
        gamma=gamma,
        strategy=strategy,
        loss_reduction=loss_reduction,
        accumulation_steps=accumulation_steps,
        seed=seed,
        perturb_k=perturb_k,
        secure_mode=secure_mode,
        loss_scale=loss_scale,
        nonfinite=nonfinite,
    )
    if adaptive_clipping is not None:
        from .adaptive import attach as attach_adaptive

        attach_adaptive(engine, adaptive_clipping)
    parallel = None
    if distributed is not False:
        from .distributed import DataParallelState, resolve_group

        parallel = DataParallelState(resolve_group(distributed))
        parallel.agree(
            {
                "noise_multiplier": noise_multiplier,
                "expected_batch_size": expected_batch_size,
                "sample_rate": sample_rate,
                "bounds": bounds,
                "clipping": (clipping, gamma),
                "groups": [[tuple(p.shape) for p in ps] for ps in clip_groups],
                "strategy": strategy,
                "loss_reduction": loss_reduction,
                "accumulation_steps": accumulation_steps,
                "accountant": accountant,
                "perturb_k": perturb_k,
                "nonfinite": nonfinite,
                "secure_mode": bool(secure_mode),  # one rank drawing Philox noise would weaken a secure run
                "adaptive_clipping": repr(engine.adaptive.config) if engine.adaptive is not None else None,
                "privacy account so far": repr(spent),  # a rank continuing a run alone would report another epsilon
                "steps so far": previous.steps if previous is not None else 0,
            }
        )
        parallel.broadcast_model(model)
        engine.world_size, engine.rank = parallel.world_size, parallel.rank
        engine.parallel = parallel
        if sharded:
            engine.sharding = parallel.sharded = ShardedParams(model, engine, parallel.group)
    if previous is not None:
        engine.continue_from(previous, keep_seed=seed is None)
    engine.attach(model)
    if previous is not None:
        previous.retire()
    ForwardGuard.attach(model, next(iter(modules.values())))
    acct = Accountant(accountant, list(spent)) if sample_rate is not None else None
    dp_opt = DPOptimizer(optimizer, engine, accountant=acct, sample_rate=sample_rate)
    dp_opt.parallel = parallel
    if target_delta is not None:
        dp_opt.target_delta = target_delta  # type: ignore[attr-defined]
    if target_epsilon is not None:  # the steps planned for the whole run, those already taken included
        dp_opt.budget = (float(target_epsilon), int(steps or 0) + sum(n for _, _, n in spent))
    return model, dp_opt


def _copied_engine(m: nn.Module) -> bool:
    eng = m.__dict__.get("_dp_engine")
    return isinstance(eng, DetachedEngine) and eng.why == _COPIED


def _run_so_far(model: nn.Module, sample_rate: float | None) -> tuple[Engine | None, list]:
    """make_private on a model that is already private continues its run: the engine it had (to take over
    its step counter and seed, so that no noise stream repeats) and the privacy account's history."""
    previous = attached_engine(model)
    if previous is None:
        copied = [n or "<model>" for n, m in model.named_modules() if _copied_engine(m)]
        if copied:
            warnings.warn(
                f"the model is a copy of a private model (copy.deepcopy, pickle or torch.load; DP layers "
                f"{copied[:4]}): its weights hold the original's private steps, but this make_private starts a "
                f"privacy account of 0 steps. Continue the original run's account with "
                f"optimizer.load_state_dict(the original DPOptimizer's state_dict())",
                stacklevel=3,
            )
        return None, []
    previous.check_replaceable()
    if previous.accountant is None:
        if previous.steps > 0 and sample_rate is not None:
            warnings.warn(
                f"the model took {previous.steps} private step(s) without a privacy account (no sample_rate at the "
                f"first make_private): the epsilon reported from now on leaves them out",
                stacklevel=3,
            )
        return previous, []
    if sample_rate is None:
        raise ValueError(
            f"the model is already private and its privacy account holds {previous.accountant.steps} step(s): give "
            f"sample_rate (or dataset_size) again so that the account continues"
        )
    return previous, list(previous.accountant.history)
