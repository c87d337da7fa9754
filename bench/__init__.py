"""Benchmarks of dpkernels against non-DP training, Opacus and fastDP; see bench/results/README.md.

python -m bench --models gpt2-small --batch-sizes 32 --dtype fp32,bf16 --modes all --device cuda
"""
