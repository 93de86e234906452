#!/usr/bin/env bash
# The GPU half of the kernel work, as one script for a lent GPU machine: its own torch, triton and
# transformers 5 (an H100/H200 CUDA image: Python 3.12, torch 2.11, transformers 5.17, triton 3.6),
# no package registry, and the checkout plus at most 64 MiB of carried files. minitron runs from the
# checkout (PYTHONPATH, nothing installed); a few pure-Python wheels carried in .wheels/ are
# installed with no network into a folder of their own, leaving the image's packages as they are.
# Writes everything under $OUT (default ./gpu-out).
#
#   here:   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .wheels \
#               pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0 \
#               liger-kernel==0.8.5                                        # then carry .wheels
#           # all py3-none-any, 2.6 MiB in all (du -cb .wheels/*.whl: 2,746,723 bytes):
#           #   pytest 411,776   pluggy 27,082   iniconfig 7,552   packaging 140,049
#           #   pygments 1,250,147 (pytest >= 8.4 needs it)   liger-kernel 910,117
#           # liger-kernel 0.8.5 asks torch >= 2.1.2, triton >= 2.3.1 and Python >= 3.10; pytest 9.2
#           # Python >= 3.10 (on 3.12 it needs no tomli / exceptiongroup).
#   there:  bash benchmarks/gpu_check.sh [quick|bar|full]       # default: bar
#
# matplotlib (distill()'s loss plot) is not carried: with its dependencies it is ~25 MB of platform
# wheels; without it distill_smoke.py skips the plot.
#
# First benchmarks/gpu_env.py: versions, what imports, which wheels it installs (only those built
# for the running Python and not already on the image, whose requirements are met) and minitron's
# minimum versions from pyproject.toml; it stops the run if Python, torch, triton or transformers
# fall short, and says which steps run in a lesser form (no pytest, liger-kernel, matplotlib). Then,
# first of all, benchmarks/distill_8b_step.py: Llama-3.1-8B -> 4.5B width at real width and two
# layers through `python -m minitron.distill` under torchrun --nproc_per_node=1 (FSDP2, bf16,
# NCCL, DCP): 6 steps of 8192 tokens, uninterrupted and killed + resumed, with and without
# activation checkpointing, and without it once more with --async-checkpoint (7 launches; budget
# ~6 min of the ~12). GPU_CHECK_SKIP_8B=1 skips it
# (for a rerun once its JSON is in). Then by mode (~5 min for bar):
# quick = the GPU tests, the benchmark's small shapes, 50 distillation steps, the bf16 loss tests.
# bar   = the same with the issue's bar shape (bf16 [8192, 128256]) for every provider (eager,
#         torch.compile, liger, minitron) and the from-hidden-states memory comparison.
# full  = bar, then the whole grid without torch.compile (one compile per shape does not fit a lease).
set -euo pipefail
MODE=${1:-bar}
case "$MODE" in
    quick|bar|full) ;;
    *) echo "usage: $0 [quick|bar|full]" >&2; exit 2 ;;
esac
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"

SITE=$(mktemp -d)
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
env_check() {
    "$PY" benchmarks/gpu_env.py --wheels .wheels --out "$OUT" --stage "$1" "${@:2}" || {
        echo "ENVIRONMENT CHECK FAILED (see $OUT/gpu_env-$1.json): stopping"; exit 1; }
}
env_check plan --install-list "$OUT/wheels-to-install.txt"
mapfile -t WHEELS < "$OUT/wheels-to-install.txt"
if ((${#WHEELS[@]})); then
    if ! "$PY" -m pip install --no-index --no-deps --target "$SITE" -q "${WHEELS[@]}"; then
        # No pip on the image: a pure-Python wheel is a zip of what site-packages would hold.
        echo "pip could not install the wheels: unpacking them into $SITE"
        for w in "${WHEELS[@]}"; do "$PY" -m zipfile -e "$w" "$SITE"; done
    fi
fi
env_check installed

if [ "${GPU_CHECK_SKIP_8B:-0}" = 1 ]; then
    echo "GPU_CHECK_SKIP_8B=1: no real-width 8B -> 4.5B distillation step"
else
    "$PY" benchmarks/distill_8b_step.py --out "$OUT" || echo "DISTILL 8B STEP FAILED"
fi

if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -p no:cacheprovider -q tests/test_kernels.py -m gpu \
        --junitxml="$OUT/gpu_tests.xml" || echo "GPU TESTS FAILED"
    "$PY" -m pytest -p no:cacheprovider -q tests/test_kernels.py -m "not gpu" \
        -k "not compile" -x || echo "CPU-SHAPED KERNEL TESTS FAILED ON THE GPU"
else
    echo "pytest does not import and .wheels/ brought none: no GPU tests, benchmark only"
fi

case "$MODE" in
    quick) "$PY" benchmarks/bench_softmax_kl.py --quick --out "$OUT" ;;
    bar|full)
        "$PY" benchmarks/bench_softmax_kl.py --vocab 128256 --tokens 8192 --dtypes bf16 --out "$OUT" ;;
esac
# 50 steps of the demo's distillation shape (Llama-3's 128k vocabulary: the fused linear+KL form)
# with the default precision policy (bf16 on a GPU), through the real training loop, on the
# image's own transformers.
"$PY" benchmarks/distill_smoke.py --steps 50 --out "$OUT" || echo "DISTILL SMOKE FAILED"
if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -p no:cacheprovider -q tests/test_bf16.py -x || echo "BF16 LOSS TESTS FAILED"
fi
if [ "$MODE" = full ]; then
    "$PY" benchmarks/bench_softmax_kl.py --no-compile --no-linear --out "$OUT"
fi
ls -l "$OUT"
