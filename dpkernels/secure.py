"""Secure noise mode: ``make_private(..., secure_mode=True)``.

The default mode draws its noise from Philox (Triton, csrc) or torch.Generator (reference) keyed by a
63-bit seed: statistically sound, but not a cryptographic generator, and its Box-Muller sampler works
in float32. Secure mode replaces both, on every backend:

- the key: 256 bits from the operating system (``os.urandom``) per make_private call, held by a
  `SecureNoise` that refuses to be pickled or copied and never prints it; a user seed is refused;
- the stream: ChaCha20 (RFC 8439) under that key with nonce (step, parameter index, rank) and block
  counter = the element's flat index, so every (step, parameter, rank) has its own stream and every
  element can be computed alone (in a kernel, in any order);
- the sampler: four Box-Muller normals from 53-bit uniforms summed and halved, in float64, and the
  update scale * (clipped sum + sigma R_total z) formed in float64 and rounded once to the parameter's
  dtype (dpkernels/ops/reference/chacha.py says what this resists and what it does not guarantee).

The noise runs as its own op after each clipped sum (``ops.secure_noise``: reference, Triton, csrc),
not fused into the clipped-sum epilogues; README "Secure noise" gives its cost.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from torch import Tensor

from . import ops
from .ops.reference.chacha import MASK


def check_seed(secure_mode: bool, seed: int | None) -> None:
    """A seed with secure_mode is refused: the key must come from the OS, and a known seed makes the noise known."""
    if secure_mode and seed is not None:
        raise ValueError(
            "secure_mode draws the noise key from the operating system and refuses a seed (a known seed makes "
            "the noise predictable): drop seed=..., or drop secure_mode for a reproducible test run"
        )


class SecureNoise:
    """The OS-drawn ChaCha20 key of one private run, and the noise it keys."""

    __slots__ = ("_key",)

    def __init__(self) -> None:
        self._key = list(struct.unpack("<8I", os.urandom(32)))

    def __reduce__(self) -> Any:
        raise TypeError(
            "the secure-mode noise key is never pickled, copied or saved (whoever holds it can subtract the noise); "
            "save the model's state_dict and the optimizer's, and call make_private(secure_mode=True) again to resume"
        )

    def __repr__(self) -> str:
        return "SecureNoise(ChaCha20, key from os.urandom, not shown)"

    @staticmethod
    def nonce(step: int, index: int, rank: int) -> list[int]:
        """The 96-bit nonce (step, parameter index, rank) of a parameter's stream in a step."""
        for name, v in (("step", step), ("parameter index", index), ("rank", rank)):
            if not 0 <= v <= MASK:
                raise ValueError(
                    f"secure_mode: the {name} {v} does not fit the 32 bits the ChaCha20 nonce gives it; "
                    f"call make_private again (a fresh key) to continue"
                )
        return [step, index, rank]

    def noise(
        self,
        prev: Tensor | None,
        shape: Any,
        *,
        noise_std: float,
        scale: float,
        step: int,
        index: int,
        rank: int,
        device: Any,
        dtype: Any,
    ) -> Tensor:
        """scale * (prev + noise_std * z) with z the stream of (step, index, rank), rounded once to ``dtype``."""
        return ops.secure_noise(
            prev,
            tuple(shape),
            noise_std=noise_std,
            scale=scale,
            key=self._key,
            nonce=self.nonce(step, index, rank),
            device=device,
            dtype=dtype,
        )
