"""What the paper experiments share: quiet accounting logs, one torch thread, spread over seeds, output files."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DELTA = 1e-5


@contextlib.contextmanager
def quiet_single_thread(threads: int = 1) -> Iterator[None]:
    """One torch thread (these models are too small for intra-op parallelism to pay, and the machine is shared)
    and dp-accounting's per-order RDP warnings silenced; both restored on exit (tests call main())."""
    absl = logging.getLogger("absl")
    level, before = absl.level, torch.get_num_threads()
    absl.setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        absl.setLevel(level)


_EPSILON: dict[tuple[Any, ...], float] = {}


def spent_epsilon(accountant: Any, delta: float = DELTA) -> float:
    """``accountant.get_epsilon(delta)``, computed once per composition: runs that took the same steps
    (the same (noise multiplier, sample rate, steps) history) spent the same epsilon, and dp-accounting's
    RDP takes seconds per call (fractional orders), more than a whole small training run."""
    key = (accountant.mechanism, tuple(accountant.history), delta)
    if key not in _EPSILON:
        _EPSILON[key] = accountant.get_epsilon(delta)
    return _EPSILON[key]


def spread(xs: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, min, max and count of one point's runs (one per seed)."""
    xs = [float(x) for x in xs]
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def fmt(s: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± std (n=k)', scaled (accuracies print as percent)."""
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f} (n={s['n']})"


def write_outputs(out: Path, stem: str, payload: dict[str, Any], markdown: str) -> list[Path]:
    """Write ``stem``.json (every run's numbers) and ``stem``.md (the tables) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(payload, indent=1, allow_nan=False, default=_jsonable) + "\n")
    paths[1].write_text(markdown.rstrip() + "\n")
    return paths


def publish(out: Path, stem: str, res: dict[str, Any], markdown: str, plot: Callable[[Any, Path], Any]) -> int:
    """Write ``stem``.json/.md and the figure ``stem``.png under ``out``, print the tables and what was written."""
    paths = [*write_outputs(out, stem, res, markdown), out / f"{stem}.png"]
    plot(res, paths[-1])
    print(markdown)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def finite(x: float) -> bool:
    return isinstance(x, float | int) and math.isfinite(x)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
