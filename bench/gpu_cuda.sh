#!/usr/bin/env bash
# The GPU checks of the compiled backend (csrc/), for a session that is lent a machine; written and
# dry-run without one, so it has NOT run yet. One prepared script, stages chosen per device call:
#
#   bash bench/gpu_cuda.sh prepare     # HERE: build the CUDA library (nvcc, no GPU needed) and copy it
#                                      # to dpkernels/_C.so, which the loader prefers (delete it after)
#   bash bench/gpu_cuda.sh tests       # ON THE DEVICE: test_cuda_* on CUDA (gpu-marked included: every op, the
#                                      # Linear / Conv clipped-sum tiles, the Conv norm tiles, the noise stream)
#   bash bench/gpu_cuda.sh sanitize    # ON THE DEVICE: compute-sanitizer memcheck and racecheck on the
#                                      # gpu-marked tests (the tile kernels' shared memory and block reductions)
#   bash bench/gpu_cuda.sh ops         # ON THE DEVICE: op benchmarks, cuda vs triton vs reference
#   bash bench/gpu_cuda.sh linear      # ON THE DEVICE: the paths of the Linear and Conv clipped sums and of the
#                                      # Conv norms (tiles, cuBLAS / cuDNN / unfold + bmm, Triton, reference):
#                                      # decides their CUDA default
#
# Device call (run tool): command "bash bench/gpu_cuda.sh tests sanitize linear ops", carry ["dpkernels/_C.so"],
# timeout_s 590 (the stages' own limits below add up to 570 s: tests 90, memcheck 150, racecheck 120,
# linear 60, ops 150; ops, the last, may stop early and still leave its rows). Without a carried library the device builds it (needs nvcc
# there; minutes). Results under $OUT (or bench/results/gpu-cuda/): copy them to bench/results/<device>/
# and commit them naming the device. DRY=1 prints the commands instead of running them; DRY=cpu runs
# the Python parts on the CPU instead (the CPU tests, the path tables with --quick, an ops smoke run),
# a check of the script itself, not of the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-cuda}"
[[ -z "${DRY:-}" ]] || OUT="$(mktemp -d)"  # a dry run's logs (the commands) stay out of the repository
run() { if [[ -n "${DRY:-}" && "${DRY:-}" != cpu ]]; then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi; }
DEV=cuda
[[ "${DRY:-}" != cpu ]] || DEV=cpu

prepare() {
    run python3 -m dpkernels.ops.cuda.build
    local so
    so="$(python3 -c 'from dpkernels.ops.cuda._build import build_dir; print(build_dir(True) / "dpkernels_C_cuda.so")' 2>/dev/null)"
    run cp "$so" dpkernels/_C.so
}

setup() {
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export DPKERNELS_REQUIRE_COMPILED=1
    [[ "$DEV" == cpu ]] || export DPKERNELS_GPU_TESTS=1
    mkdir -p "$OUT"
    [[ "$DEV" == cpu ]] || run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    run python3 -m dpkernels.ops.cuda.build
}

# Each stage runs under its own limit (seconds; env overrides), so that a slow one leaves the next its
# time and the call fits one device command (10 min): the limits add up to 570 s.
LIMIT_TESTS="${LIMIT_TESTS:-90}" LIMIT_MEMCHECK="${LIMIT_MEMCHECK:-150}" LIMIT_RACECHECK="${LIMIT_RACECHECK:-120}"
LIMIT_LINEAR="${LIMIT_LINEAR:-60}" LIMIT_OPS="${LIMIT_OPS:-150}"

tests() {  # every compiled-op test; the gpu-marked ones run the ops and the noise stream on CUDA
    run timeout "$LIMIT_TESTS" python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" \
        tests/ops/test_cuda_ops.py tests/ops/test_cuda_noise.py --junitxml="$OUT/cuda_tests.xml" 2>&1 \
        | tee "$OUT/cuda_tests.log"
}

sanitize() {  # compute-sanitizer on the gpu-marked tests: memcheck on all (the tile kernels first), racecheck
    # on the tile kernels (shared memory, the norm tiles' block reductions) for each shared-memory layout
    # (fp32 and fp64 words; the 16-bit inputs are converted before they reach shared memory)
    [[ "$DEV" == cuda ]] || { echo "sanitize: needs a GPU (skipped on $DEV)"; return 0; }
    local san=(compute-sanitizer --error-exitcode 1 --target-processes all)
    local pyt=(python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_cuda_ops.py tests/ops/test_cuda_noise.py)
    local half=$((LIMIT_MEMCHECK / 2))
    run timeout "$half" "${san[@]}" --tool memcheck "${pyt[@]}" -k "tiles_on_cuda" 2>&1 | tee "$OUT/sanitizer_memcheck.log"
    run timeout "$half" "${san[@]}" --tool memcheck "${pyt[@]}" -k "not tiles_on_cuda" 2>&1 \
        | tee -a "$OUT/sanitizer_memcheck.log"
    run timeout "$LIMIT_RACECHECK" "${san[@]}" --tool racecheck "${pyt[@]}" -k "tiles_on_cuda and (float32 or float64)" \
        2>&1 | tee "$OUT/sanitizer_racecheck.log"
}

ops() {  # every op, every backend available there (reference, triton, cuda), do_bench, TFLOP/s and GB/s
    local args=(--device cuda --dtype bf16,fp32 --backends reference,triton,cuda)
    [[ "$DEV" == cuda ]] || args=(--device cpu --dtype fp32 --backends reference,cuda --cases cpu)
    run timeout "$LIMIT_OPS" python3 -m bench.ops "${args[@]}" --csv "$OUT/ops.csv" 2>&1 | tee "$OUT/ops.md"
}

linear() {  # the compiled clipped sums' and conv norms' tile kernels against their ATen paths, Triton, the reference
    local quick=()
    [[ "$DEV" == cuda ]] || quick=(--quick)
    run timeout "$LIMIT_LINEAR" python3 -m bench.cuda_cpu --linear-only "$DEV" "${quick[@]}" \
        --out "$OUT/linear_paths.md" 2>&1 | tee "$OUT/linear_paths.log"
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
