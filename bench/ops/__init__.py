"""Op-level benchmarks, one file per dpkernels op (bench_<op>.py); see bench/ops/_common.py.

python -m bench.ops --device cuda                 # every op, every backend, do_bench, H100 fractions
python -m bench.ops.bench_linear_norms --device cuda
python -m pytest bench/ops --benchmark-only       # CPU, reference path, pytest-benchmark
"""
