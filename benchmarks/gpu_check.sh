#!/usr/bin/env bash
# The GPU half of the kernel work, as one script for a lent GPU machine (torch and triton are
# preinstalled there; it has no package registry). Writes everything under $OUT (default ./gpu-out).
#
#   here:   pip download --no-deps --only-binary=:all: -d .wheels \
#               pytest pluggy iniconfig packaging pygments liger-kernel==0.8.5   # carry .wheels
#   there:  bash benchmarks/gpu_check.sh [quick|bar|full]       # default: bar
#
# bar  = the GPU tests, then the bar shape (bf16 [8192, 128256]) with every provider, then
#        the from-hidden-states memory comparison, then 50 distillation steps of the demo's shape
#        (benchmarks/distill_smoke.py, needs transformers 4.57 from .wheels/): about 4 minutes.
# full = bar, then the whole grid without torch.compile (one compile per shape does not fit a lease).
set -euo pipefail
MODE=${1:-bar}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# minitron.kernels lives in kernels/ and is mapped by the package install; without network or
# build isolation an editable install may fail, so fall back to a path shim.
if ! "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . 2>/dev/null; then
    SHIM=$(mktemp -d)
    cp -r minitron "$SHIM/minitron"
    ln -s "$PWD/kernels" "$SHIM/minitron/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
if compgen -G ".wheels/*.whl" >/dev/null; then
    "$PY" -m pip install --no-deps --no-index -q .wheels/*.whl || echo "wheels in .wheels/ did not install"
fi
"$PY" -c "import minitron.kernels as k; print('minitron.kernels from', k.__file__)"

if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "pytest is not installed and .wheels/ has none: no GPU tests, benchmark only"
fi
# --noconftest: the shared conftest builds tiny transformers models, which the kernel tests do not
# need (and the machine's transformers is another major version).
"$PY" -m pytest --noconftest -p no:cacheprovider -q tests/test_kernels.py -m gpu \
    --junitxml="$OUT/gpu_tests.xml" || echo "GPU TESTS FAILED"
"$PY" -m pytest --noconftest -p no:cacheprovider -q tests/test_kernels.py -m "not gpu" \
    -k "not compile" -x || echo "CPU-SHAPED KERNEL TESTS FAILED ON THE GPU"

case "$MODE" in
    quick) "$PY" benchmarks/bench_softmax_kl.py --quick --out "$OUT" ;;
    bar|full)
        "$PY" benchmarks/bench_softmax_kl.py --vocab 128256 --tokens 8192 --dtypes bf16 --out "$OUT" ;;
esac
# 50 steps of the demo's distillation shape (Llama-3's 128k vocabulary: the fused linear+KL form)
# with the default precision policy (bf16 on a GPU), through the real training loop.
"$PY" benchmarks/distill_smoke.py --steps 50 --out "$OUT" || echo "DISTILL SMOKE FAILED"
"$PY" -m pytest --noconftest -p no:cacheprovider -q tests/test_bf16.py -x || echo "BF16 LOSS TESTS FAILED"
if [ "$MODE" = full ]; then
    "$PY" benchmarks/bench_softmax_kl.py --no-compile --no-linear --out "$OUT"
fi
ls -l "$OUT"
