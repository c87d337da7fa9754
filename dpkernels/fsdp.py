"""DP training of a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Call order: ``fully_shard`` the blocks and the root, build the optimizer on the (sharded) parameters,
then ``make_private(model, optimizer, ..., distributed=True)``. The engine's parameters are FSDP's
sharded DTensor parameters, the ones the optimizer steps. FSDP all-gathers each block's weights before
its forward and backward as usual; the DP layers compute with the unsharded weights, and their
per-sample norms and clipped sums come from the full activations A and output gradients G of the
rank's own samples, so a sample's norm covers the whole parameter and every layer of its clipping
group without any cross-rank reduction (a sample lives on one rank). The DP layers hand autograd no
parameter gradient, so FSDP's own reduce-scatter has nothing to reduce for them: nothing is counted
twice.

At ``optimizer.step()`` each rank holds, for every parameter, its full-size noised share

    s_r = sum_{i in B_r} c_i g_i + (sigma R_total / sqrt(W)) z_r,     z_r ~ N(0, I) from rank r's stream,

(the data-parallel scheme of `dpkernels.distributed`), and one reduce-scatter per parameter (DTensor's
Partial -> Shard redistribution) leaves on each rank its shard of sum_r s_r: the clipped sum of the
global batch plus noise of std sigma R_total on every element, added once. Every rank noises the
whole parameter before the reduce-scatter rather than each shard's owner adding sigma R_total to its
own shard afterwards, so that no rank ever holds a noiseless sum of other ranks' samples (the
reduce-scatter's inputs are already noised), the noise stays fused into the clipped-sum epilogue, and
the guarantee is the same as without sharding. Cost: each rank draws noise for the full parameter,
as it computes the full clipped sum anyway.

Mixed precision: ``MixedPrecisionPolicy(param_dtype=...)`` runs the forward and backward in that dtype
(the DP layers see the low-precision unsharded weights; norms and sums accumulate in float32); the
reduce is the engine's, in the accumulation dtype (float32, float64 for float64 parameters), so
``reduce_dtype`` is not used. Parameters must be sharded over every rank of the DP process group
(a 1-D mesh; HSDP's 2-D mesh is refused). Memory per rank: parameters and optimizer state sharded;
the full-size clipped sums exist from the end of backward to the step (one parameter's at a time
after it), as in the unsharded data-parallel path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp2(m: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``m`` (not the legacy FullyShardedDataParallel wrapper)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(m, FSDPModule)


def check_module(name: str, m: nn.Module) -> None:
    """A fully_shard module must be a container (a block, the root): one that is itself a layer make_private
    converts (its class is now FSDP<Layer>) cannot become its DP layer. Refused, naming it."""
    from .api import dp_class_of_type

    bases = [b for b in type(m).__bases__ if not b.__module__.startswith("torch.distributed.fsdp")]
    if any(dp_class_of_type(b) is not None for b in bases):
        raise ValueError(
            f"module {name or '<model>'!r} is a {bases[0].__name__} that fully_shard was applied to directly: "
            f"make_private cannot turn it into its DP layer once FSDP has changed its class. Apply fully_shard to "
            f"the modules containing the layers (transformer blocks, the root model), not to the layers themselves"
        )


class ShardedParams:
    """The FSDP2 side of a private model: which engine parameters are sharded, the tensors FSDP puts in
    their place during forward and backward, and the reduce-scatter of the noised sums at the step."""

    def __init__(self, model: nn.Module, engine: Any, group: Any):
        from torch.distributed.tensor import DTensor

        from .guard import ForwardGuard

        self.world_size = dist.get_world_size(group)
        mods = fsdp_modules(model)
        # FSDP creates a parameter's unsharded tensor at its first all-gather and keeps that object for the
        # rest of training: gather once here so that autograd's view of every parameter is known up front,
        # one module at a time (never more than one module's full weights in memory).
        for m in mods:
            m.unshard()  # type: ignore[operator]
            m.reshard()  # type: ignore[operator]
        self.fsdp: dict[int, Any] = {}  # id(sharded parameter) -> FSDPParam
        for m in mods:
            for pg in m._get_fsdp_state()._fsdp_param_groups:  # type: ignore[operator]
                for fp in pg.fsdp_params:
                    self.fsdp[id(fp.sharded_param)] = fp
        names = engine._pname
        for p in engine._params:
            if not isinstance(p, DTensor):
                continue
            name = names.get(id(p), str(tuple(p.shape)))
            fp = self.fsdp.get(id(p))
            if fp is None:
                raise ValueError(
                    f"parameter {name!r} is a DTensor that no fully_shard module manages (tensor parallelism?): "
                    f"make_private supports FSDP2's fully_shard only"
                )
            mesh = p.device_mesh
            if mesh.ndim != 1 or mesh.size() != self.world_size:
                raise ValueError(
                    f"parameter {name!r} is sharded over a {mesh.ndim}-D mesh of {mesh.size()} ranks, the DP process "
                    f"group has {self.world_size}: make_private needs every parameter sharded over all the ranks of "
                    f"the group (fully_shard with a 1-D mesh, not HSDP); the sum over ranks is one DP step"
                )
            if getattr(fp, "offload_to_cpu", False):
                raise ValueError(f"parameter {name!r}: fully_shard(offload_policy=CPUOffloadPolicy()) is not supported")
            hook = functools.partial(engine._raw_use, name)
            hook._dpkernels_engine_hook = True  # type: ignore[attr-defined]
            engine._handles.append(fp._unsharded_param.register_hook(hook))
        self.pending: dict[int, Tensor] = {}  # full-size noised shares, until the step's reduce-scatter
        self.mods = mods
        for m in mods:  # prepended: before FSDP's own pre-forward, which a stale state would misdirect
            engine._handles.append(m.register_forward_pre_hook(self._recover, prepend=True))
            # the privacy guard's pre-hook stays first (make_private again finds it on the root already)
            for k, h in list(m._forward_pre_hooks.items()):
                if isinstance(getattr(h, "__self__", None), ForwardGuard):
                    m._forward_pre_hooks.move_to_end(k, last=False)  # type: ignore[attr-defined]
        self._of_tensor = {id(t): fp for fp in self.fsdp.values() for t in (fp.sharded_param, fp._unsharded_param)}

    def _recover(self, module: nn.Module, args: Any) -> None:
        """Before a forward outside backward: reset FSDP if a backward pass failed part way (an error in a DP
        layer's backward, the engine's refusals, or any exception between two blocks).

        FSDP resets its per-iteration state in a callback at the end of backward, which autograd drops when the
        pass raises: the root stays in PRE_BACKWARD with its parameters unsharded, so the next forward is taken
        for an activation-checkpointing recomputation inside backward, skips the all-gather and computes with the
        stale unsharded weights, and every later optimizer step updates shards the model never uses again.
        ``reset_iter_state`` (FSDP's recovery after an aborted iteration) waits on in-flight collectives, reshards
        and sets every state idle; the failed pass's gradients are discarded, as the engine's abort discards its."""
        if torch._C._current_graph_task_id() != -1:  # a recomputation inside backward: FSDP's own business
            return
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        ctx = module._get_fsdp_state()._state_ctx  # type: ignore[operator]
        if ctx.iter_forward_root is not None:  # inside the root's forward: the pass began clean
            return
        if not ctx.post_backward_final_callback_queued and all(
            s._training_state == TrainingState.IDLE for s in ctx.all_states
        ):
            return
        root = next((m for m in self.mods if m._get_fsdp_state()._is_root), module)  # type: ignore[operator]
        reset = getattr(root, "reset_iter_state", None)
        if reset is None:  # pragma: no cover - torch without FSDPModule.reset_iter_state
            raise RuntimeError(
                f"a backward pass of this fully_shard model failed part way, and this torch "
                f"({torch.__version__}) has no FSDPModule.reset_iter_state to reset FSDP's state: the next "
                f"forward would compute with stale unsharded weights. Upgrade torch, or rebuild the model "
                f"(fully_shard, then make_private) from its last saved state"
            )
        reset()

    def local_shard(self, t: Tensor) -> Tensor | None:
        """This rank's shard of the parameter ``t`` stands for in a module (the sharded parameter itself, or the
        unsharded or post-forward tensor FSDP put in its place), or None if ``t`` is none of FSDP's."""
        fp = self._of_tensor.get(id(t))
        if fp is None:
            fp = next((f for f in self.fsdp.values() if getattr(f, "_sharded_post_forward_param", None) is t), None)
        return None if fp is None else fp.sharded_param._local_tensor

    def manages(self, p: Tensor) -> bool:
        return id(p) in self.fsdp

    def graph_params(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The tensors autograd sees for ``params``: FSDP's unsharded parameter of each sharded one."""
        return [self.fsdp[id(p)]._unsharded_param if id(p) in self.fsdp else p for p in params]

    @contextmanager
    def canonical(self, owned: Sequence[tuple[nn.Module, str, Tensor]], name_of: dict) -> Iterator[None]:
        """The engine's (sharded) parameters on the DP modules while the engine works on them, in place of the
        unsharded ones FSDP set for forward/backward: the DP layers' norms and sums use a parameter only for its
        identity, shape and dtype (global for a DTensor), never its values. Restored afterwards."""
        swapped = []
        try:
            for m, k, q in owned:
                cur = m._parameters.get(k)
                if cur is q:
                    continue
                fp = self.fsdp.get(id(q))
                if fp is None or not (
                    cur is getattr(fp, "_unsharded_param", None)
                    or cur is getattr(fp, "_sharded_post_forward_param", None)
                ):
                    raise RuntimeError(
                        f"parameter {name_of.get(m, type(m).__name__)}.{k} was replaced after make_private: the "
                        f"engine would clip and noise the old one. Call make_private again after replacing a "
                        f"parameter (with fully_shard: fully_shard first, then make_private(..., distributed=True))"
                    )
                m._parameters[k] = q  # type: ignore[assignment]
                swapped.append((m, k, cur))
            yield
        finally:
            for m, k, cur in swapped:
                m._parameters[k] = cur

    def write(self, p: Tensor, grad: Tensor) -> None:
        """Keep rank's full-size noised share of ``p``'s gradient for the step's reduce-scatter."""
        self.pending[id(p)] = grad

    def reduce_scatter(self, params: Sequence[Tensor]) -> None:
        """Each sharded parameter's .grad = its shard of the sum over ranks of their shares; one reduce-scatter
        per parameter, in the engine's parameter order (the same on every rank)."""
        from torch.distributed.tensor import DTensor, Partial

        for p in params:
            full = self.pending.pop(id(p), None)
            if full is None:
                continue
            mesh = p.device_mesh  # type: ignore[attr-defined]
            share = DTensor.from_local(full.contiguous(), mesh, [Partial()] * mesh.ndim, run_check=False)
            p.grad = share.redistribute(mesh, p.placements)  # type: ignore[attr-defined]
        self.pending.clear()


__all__ = ["ShardedParams", "check_module", "fsdp_modules", "is_fsdp2"]
