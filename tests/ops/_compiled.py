"""The compiled backend for its tests: imported (built on first use), or the test module skipped with
the reason when it cannot be built here. With DPKERNELS_REQUIRE_COMPILED=1 (CI, which builds it before
the tests) a failure to load is an error, not a skip."""

from __future__ import annotations

import os

import pytest


def compiled_backend():
    try:
        import dpkernels.ops.cuda as cu
    except Exception as exc:
        if os.environ.get("DPKERNELS_REQUIRE_COMPILED"):
            raise
        pytest.skip(f"the compiled backend (csrc/) cannot be built or loaded here: {exc}", allow_module_level=True)
    return cu
