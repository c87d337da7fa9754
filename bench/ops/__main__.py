"""python -m bench.ops [--device cuda] ...: every op benchmark in one table (see bench/ops/_common.py)."""

import importlib
import pkgutil
import sys

import bench.ops as pkg

from ._common import run

mods = [importlib.import_module(f"bench.ops.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)
        if m.name.startswith("bench_")]  # fmt: skip
run(mods, sys.argv[1:])
