#!/usr/bin/env bash
# The GPU checks of a session that is lent a machine, one stage per device call (each call has a
# 10-minute limit; the session 30 minutes of device time in all).
#
#   bash bench/gpu_session.sh prepare [FASTDP_DIR]   # HERE, before the first call: the wheels the
#                                                    # device lacks into .whl/, fastDP's source into .fastdp/
#   bash bench/gpu_session.sh tests                  # ON THE DEVICE: the Triton op tests on the GPU
#   bash bench/gpu_session.sh ops                    # ON THE DEVICE: op benchmarks with the kernel launches
#   bash bench/gpu_session.sh models                 # ON THE DEVICE: GPT-2 small, B = 32, every mode, bf16
#
# A device call carries what prepare made and runs one or more stages, e.g. (device tool, run):
#   command: bash bench/gpu_session.sh tests ops    carry: [".whl", ".fastdp"]
# Everything is written under $OUT (what comes back), or bench/results/gpu-session/ without it; copy
# the results into bench/results/<device>/ and commit them with the device named.
# DRY=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-session}"
[[ -z "${DRY:-}" ]] || OUT="$(mktemp -d)"  # a dry run's logs (the commands) stay out of the repository
run() { if [[ -n "${DRY:-}" ]]; then printf '+'; printf ' %q' "$@"; echo; else "$@"; fi; }

# The device image has torch, triton, pytest (+ xdist, benchmark), hypothesis, transformers, peft,
# torchvision, scikit-learn, scipy and matplotlib; these it lacks (KINDS.md's package list).
WHEELS=(opacus==1.6.0 dp-accounting==0.6.0 dm-tree==0.1.9)

prepare() {
    local fastdp="${1:-}"
    run python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    if [[ -n "$fastdp" ]]; then  # the directory that holds fastDP/ (not on PyPI; never committed)
        run mkdir -p .fastdp
        run cp -r "$fastdp/fastDP" .fastdp/
    fi
}

setup() {  # on the device: the carried wheels onto the path, the checkout importable
    if compgen -G ".whl/*.whl" >/dev/null; then
        run python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # the compiled backend (csrc/) has its own session, bench/gpu_cuda.sh: without its carried library
    # (dpkernels/_C.so) it stays off here, as building it would spend minutes of device time
    [[ -e dpkernels/_C.so ]] || export DPKERNELS_CUDA="${DPKERNELS_CUDA:-0}"
    mkdir -p "$OUT"
    run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    run python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
}

tests() {  # tests/ops' Triton tests on the GPU (tests/conftest.py), the reference op tests, the gpu-marked ones
    export DPKERNELS_GPU_TESTS=1  # tests/conftest.py then leaves TRITON_INTERPRET unset
    run python3 -m pytest -q -n 8 -p no:cacheprovider -m "gpu or not slow" \
        tests/ops tests/layers/test_norm_layers.py --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
    unset DPKERNELS_GPU_TESTS
}

ops() {  # every op, every backend, triton.testing.do_bench, the launches each kernel made
    run python3 -m bench.ops --device cuda --dtype bf16,fp32 --csv "$OUT/ops.csv" 2>&1 | tee "$OUT/ops.md"
}

models() {  # the headline case; bench/results/README.md lists the rest
    local fastdp=()
    [[ -d .fastdp/fastDP ]] && fastdp=(--fastdp-path .fastdp)
    run python3 -m bench --models gpt2-small --batch-sizes 32 --dtype bf16 --modes all --device cuda \
        --steps 20 --warmup 5 "${fastdp[@]}" --out "$OUT/models"
}

[[ $# -ge 1 ]] || { sed -n '2,15p' "$0"; exit 2; }
if [[ "$1" == prepare ]]; then
    shift
    prepare "$@"
    exit 0
fi
for stage in "$@"; do
    case "$stage" in
        tests | ops | models) ;;
        *) echo "unknown stage: $stage (tests, ops, models; or prepare)" >&2; exit 2 ;;
    esac
done
setup
failed=()
for stage in "$@"; do  # a failing stage does not stop the next: its log says what failed
    "$stage" || failed+=("$stage")
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "failed stage(s): ${failed[*]}" >&2
    exit 1
fi
