#!/usr/bin/env bash
# The GPU checks of the compiled backend (csrc/), for a session that is lent a machine; written and
# dry-run without one, so it has NOT run yet. One prepared script, stages chosen per device call:
#
#   bash bench/gpu_cuda.sh prepare     # HERE: build the CUDA library (nvcc, no GPU needed) and copy it
#                                      # to dpkernels/_C.so, which the loader prefers (delete it after)
#   bash bench/gpu_cuda.sh tests       # ON THE DEVICE: test_cuda_* on CUDA (gpu-marked included)
#   bash bench/gpu_cuda.sh sanitize    # ON THE DEVICE: compute-sanitizer memcheck and racecheck on them
#   bash bench/gpu_cuda.sh ops         # ON THE DEVICE: op benchmarks, cuda vs triton vs reference
#   bash bench/gpu_cuda.sh linear      # ON THE DEVICE: the Linear and Conv clipped sums' paths (tiles, cuBLAS /
#                                      # cuDNN + epilogue, Triton, reference): decides their CUDA default
#
# Device call (run tool): command "bash bench/gpu_cuda.sh tests sanitize linear ops", carry ["dpkernels/_C.so"],
# timeout ~540 s (tests ~1 min, sanitizers ~3 min (racecheck: the tile kernel's shared memory), linear
# ~20 s, ops ~4 min on an H100-class part). Without a carried
# library the device builds it (needs nvcc there; minutes). Results under $OUT (or
# bench/results/gpu-cuda/): copy them to bench/results/<device>/ and commit them naming the device.
# DRY=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-cuda}"
[[ -z "${DRY:-}" ]] || OUT="$(mktemp -d)"  # a dry run's logs (the commands) stay out of the repository
run() { if [[ -n "${DRY:-}" ]]; then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi; }

prepare() {
    run python3 -m dpkernels.ops.cuda.build
    local so
    so="$(python3 -c 'from dpkernels.ops.cuda._build import build_dir; print(build_dir(True) / "dpkernels_C_cuda.so")' 2>/dev/null)"
    run cp "$so" dpkernels/_C.so
}

setup() {
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export DPKERNELS_GPU_TESTS=1 DPKERNELS_REQUIRE_COMPILED=1
    mkdir -p "$OUT"
    run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    run python3 -m dpkernels.ops.cuda.build
}

tests() {  # every compiled-op test; the gpu-marked ones run the ops and the noise stream on CUDA
    run python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/ops/test_cuda_ops.py \
        tests/ops/test_cuda_noise.py --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log"
}

sanitize() {  # the gpu-marked tests (every op on CUDA, fp64 / fp32 / bf16) under memcheck and racecheck
    for tool in memcheck racecheck; do
        run compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
            python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_cuda_ops.py tests/ops/test_cuda_noise.py \
            2>&1 | tee "$OUT/sanitizer_$tool.log"
    done
}

ops() {  # every op, every backend available there (reference, triton, cuda), do_bench, TFLOP/s and GB/s
    run python3 -m bench.ops --device cuda --dtype bf16,fp32 --backends reference,triton,cuda --csv "$OUT/ops.csv" 2>&1 | tee "$OUT/ops.md"
}

linear() {  # the compiled clipped sums' tile kernels against their cuBLAS / cuDNN path, Triton and the reference
    run python3 -m bench.cuda_cpu --linear-only cuda --out "$OUT/linear_paths.md" 2>&1 | tee "$OUT/linear_paths.log"
}

[[ $# -ge 1 ]] || { sed -n '2,20p' "$0"; exit 2; }
if [[ "$1" == prepare ]]; then
    prepare
    exit 0
fi
for stage in "$@"; do
    case "$stage" in
        tests | sanitize | linear | ops) ;;
        *) echo "unknown stage: $stage (tests, sanitize, linear, ops; or prepare)" >&2; exit 2 ;;
    esac
done
setup
failed=()
for stage in "$@"; do  # a failing stage does not stop the next: its log says what failed
    "$stage" || failed+=("$stage")
done
[[ ${#failed[@]} -eq 0 ]] || { echo "failed stages: ${failed[*]}" >&2; exit 1; }
