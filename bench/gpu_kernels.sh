#!/usr/bin/env bash
# One command for the GPU: the kernel tests (-m gpu), the CUDA-graph training test, then the kernel table.
#
#   bench/gpu_kernels.sh                           tests, then the table of ours, sdpa, sdpa-flash, flex
#   bench/gpu_kernels.sh tests                     only the kernel tests
#   bench/gpu_kernels.sh train                     only the test that CUDA-graph training equals eager
#   bench/gpu_kernels.sh bench [PROVIDERS]         only the table (default ours,sdpa,sdpa-flash,flex)
#   BEFORE=PATH bench/gpu_kernels.sh tests,bench ours,before,sdpa
#                                                  the table with another checkout's kernels as "before",
#                                                  and before_after.md: ours against it, both as x sdpa
#
# Runs from the repository root without installing (PYTHONPATH=.). Results land in $OUT (default
# bench/results): gpu.txt (device, versions), tests.log, train.log, bench.log, the bench's CSV and JSON.
# Each part has its own time limit (TEST_TIMEOUT, TRAIN_TIMEOUT, BENCH_TIMEOUT seconds), so that what a
# slow part leaves undone still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
what=${1:-tests,bench}
providers=${2:-ours,sdpa,sdpa-flash,flex}

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  date -u
} 2>&1 | tee "$OUT/gpu.txt"

want() { [[ ,$what, == *,$1,* ]]; }
status=0
if want tests; then
  timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -m gpu -q -p no:cacheprovider --durations=10 \
    tests/test_kernels.py tests/test_decode.py tests/test_bench.py tests/test_unfused.py tests/test_attention.py 2>&1 | tee "$OUT/tests.log"
  status=${PIPESTATUS[0]}
fi
if want train; then
  timeout "${TRAIN_TIMEOUT:-120}" $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_train.py \
    -k cuda_graphs 2>&1 | tee "$OUT/train.log"
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
if want bench; then
  # GPU time under CUDA graphs and host time per eager call, every provider in one process on one input
  timeout "${BENCH_TIMEOUT:-240}" $PY -m kernels.bench --providers "$providers" --modes "${MODES:-fwd,bwd,fwd_bwd}" \
    ${BEFORE:+--before "$BEFORE"} --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
exit "$status"
