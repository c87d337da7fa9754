"""Collect bench_<op>.py files as test modules (the op's one file holds its pytest-benchmark cases too).

The repository's default `python -m pytest` only looks in tests/ (testpaths), so these run only when
asked for: `python -m pytest bench/ops --benchmark-only`.
"""

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _one_thread():
    """Time single-threaded (torch.utils.benchmark.Timer's default too): on shared cores, intra-op thread
    hand-offs turn into scheduling noise far larger than the op."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
