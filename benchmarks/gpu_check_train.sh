#!/usr/bin/env bash
# The trainer part of the GPU check: a short main job on the GPU (bf16, channels_last, 8 loader
# workers, checkpoints, resume), on the benchmarks' synthetic JPEGs with their ground-truth boxes as
# proposals, as the GPU image has neither selective search (opencv-contrib) nor pycocotools (O-KNN).
# The train benchmark and the trainer's CUDA tests are gpu_check.sh's steps train_bench and
# tests_cuda_train.
#
#   usage: benchmarks/gpu_check_train.sh [OUT_DIR [TRAINER OPTIONS...]]   (default: $OUT, else
#          ./gpu-check-out; GPU_TRAIN_WORKERS and GPU_TRAIN_BATCH set the loader's workers and batch)
# Inner time limits add up to 280 s, within gpu_check.sh's 300 s for this step.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-${OUT:-gpu-check-out}}")
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$out"
py=python3

if ! $py -c "import d3ssl, sys; sys.exit(0 if d3ssl.cuda_kernels_available() else 1)" 2>/dev/null; then
  echo "gpu_check_train: d3ssl has no CUDA kernels: build it first (gpu_check.sh's build step)"
  exit 5
fi

data=$(timeout 60 $py -c "from benchmarks.common import bench_dataset
ds, store = bench_dataset(512)
print(ds.root, store.path)") || { echo "gpu_check_train: could not make the benchmark dataset"; exit 5; }
read -r root proposals <<<"$data"

status=0
echo "== main job on the GPU: 2 epochs of 512 images in batches of 64, stopped at step 8, then resumed"
rm -rf "$out/runs"
common=(--data "$root" --proposals "$proposals" --out "$out/runs" --name gpu --run.oknn false
        --run.progress false --data.workers ${GPU_TRAIN_WORKERS:-8} --data.batch_size ${GPU_TRAIN_BATCH:-64}
        --run.epochs 2 --optim.warmup_epochs 0.5 --run.ckpt_every 4)
PYTHONUNBUFFERED=1 timeout 120 $py -m train.run "${common[@]}" --run.max_steps 8 "$@" 2>&1 \
  | tee "$out/main_job.log" || status=1
PYTHONUNBUFFERED=1 timeout 100 $py -m train.run "${common[@]}" --run.max_steps none --resume auto "$@" 2>&1 \
  | tee "$out/resume.log" || status=1
grep -q "resumed from" "$out/resume.log" || { echo "gpu_check_train: the resume did not resume"; status=1; }
exit $status
