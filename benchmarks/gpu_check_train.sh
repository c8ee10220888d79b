#!/usr/bin/env bash
# The trainer part of the GPU check: a short main job on the GPU (bf16, channels_last), the trainer
# tests, and the train benchmark (full D3SSL step fed by the CPU loader vs the model-only ceiling,
# ResNet-50-C4 at 224, and SoCo's step).
#
#   usage: benchmarks/gpu_check_train.sh [OUT_DIR]      (default: $OUT, else ./gpu-check-out)
#   environment: TRAIN_BENCH_ARGS  extra arguments for benchmarks/throughput.py (e.g. --quick)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check-out}}
mkdir -p "$out"
py=python3

if ! $py -c "import d3ssl, sys; sys.exit(0 if d3ssl.cuda_kernels_available() else 1)" 2>/dev/null; then
  echo "gpu_check_train: building d3ssl with its CUDA kernels"
  TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=${MAX_JOBS:-16} $py setup.py build_ext --inplace > "$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; exit 5; }
fi

status=0
echo "== train benchmark (cuda)"
PYTHONUNBUFFERED=1 $py benchmarks/throughput.py --section train --device cuda --backend cpu \
  --json "$out/train.json" ${TRAIN_BENCH_ARGS:-} 2>&1 | tee "$out/train_bench.log" || status=1

echo "== main job on the GPU, one epoch of the default preset"
rm -rf "$out/runs"
PYTHONUNBUFFERED=1 timeout 300 $py -m train.run --out "$out/runs" --name gpu --run.epochs 1 \
  --optim.warmup_epochs 0.2 --run.progress false --data.workers 8 2>&1 | tee "$out/main_job.log" || status=1

echo "== trainer tests"
PYTHONUNBUFFERED=1 timeout 300 $py -m pytest -q -x tests/test_trainer.py -k "not sigkill and not sigterm" \
  2>&1 | tee "$out/test_trainer.log" || status=1
exit $status
