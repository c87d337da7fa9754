"""The strategies: how the backward passes of one micro-batch are run, and what each pass does.

Both answer the engine through one interface:

    run(engine, loss)   the micro-batch's backward pass(es)
    check_pass()        a backward pass may start (two-pass refuses a bare loss.backward())
    takes_norms         the pass in progress takes per-sample norms (and so new clip factors)
    sums                the pass in progress computes clipped sums
    took_norms(tie, n)  the pass took the norms ``n`` of ``tie``'s uses
    normed(tie)         the norms of ``tie`` were taken for the sums of this pass

"bk" (book-keeping): one backward; each layer's (input, G) is kept until its clipping group closes,
then clipped and summed. "two-pass" (ghost clipping): a norms-only backward (autograd.grad with
respect to the DP parameters: no leaf's .grad is written), then a backward in which each layer
clips its own G rows with the now-known factors; nothing is kept between the passes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class BookKeeping:
    name = "bk"
    takes_norms = True
    sums = True

    def run(self, engine: Any, loss: Tensor) -> None:
        loss.backward()

    def check_pass(self) -> None:
        pass

    def took_norms(self, tie: Any, norms: dict[int, Tensor]) -> None:
        pass

    def normed(self, tie: Any) -> bool:
        return True

    def norms_taken(self, tie: Any) -> dict[int, Tensor] | None:
        return None


class TwoPass:
    name = "two-pass"

    def __init__(self) -> None:
        self.phase: str | None = None  # "norms" or "apply" while `run` runs them
        # the ties whose norms the norms pass took, and those norms {id(p): (B,)}: the clipping pass's per-sample
        # gradients must not exceed them (`norms_taken`)
        self._norms: dict[int, dict[int, Tensor]] = {}

    @property
    def takes_norms(self) -> bool:
        return self.phase != "apply"  # the clipping pass keeps the norms pass's factors

    @property
    def sums(self) -> bool:
        return self.phase != "norms"

    def check_pass(self) -> None:
        if self.phase is None:
            raise RuntimeError(
                "strategy='two-pass' runs two backward passes: call optimizer.backward(loss) instead of loss.backward()"
            )

    def took_norms(self, tie: Any, norms: dict[int, Tensor]) -> None:
        self._norms[id(tie)] = norms

    def normed(self, tie: Any) -> bool:
        return id(tie) in self._norms

    def norms_taken(self, tie: Any) -> dict[int, Tensor] | None:
        """The norms pass's certified squared norms of ``tie``'s parameters, which its clip factors came from."""
        return self._norms.get(id(tie))

    def run(self, engine: Any, loss: Tensor) -> None:
        try:
            self.phase = "norms"
            self._norms.clear()
            # autograd.grad, not backward: the norms pass must not accumulate into any leaf's .grad
            # (an input that requires grad would otherwise get its gradient twice). The DP parameters
            # as inputs make autograd run every DP layer's backward; they receive None.
            torch.autograd.grad(
                loss,
                engine._graph_params([p for p in engine._params if p.requires_grad]),
                retain_graph=True,
                allow_unused=True,
            )
            self.phase = "apply"
            loss.backward()
        finally:
            self.phase = None
            engine._factors = [None] * len(engine.groups)  # the batch's clip factors: secret, used up
            self._norms.clear()
            engine._drop_pass()


def make_strategy(name: str) -> BookKeeping | TwoPass:
    """The strategy object of an `EngineConfig.strategy` name (validated there)."""
    return TwoPass() if name == "two-pass" else BookKeeping()
