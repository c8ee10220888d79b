#!/usr/bin/env bash
# The GPU check: on a machine with a GPU, torch already installed and no network, build the
# extension, run the CUDA tests and the GPU benchmarks, and leave logs and JSON in OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Each step has its own time limit, and a failing step does not stop the later ones; the exit status
# is non-zero if any step failed. All steps take more than one call's 10 minutes: run them in groups
# with GPU_CHECK_STEPS (benchmarks/RESULTS.md lists the groups each measurement came from).
# DALI is not on the GPU machine: benchmarks/gpu_check_dali.sh installs it from carried wheel parts.
#
# One lease with DALI, as it ran on 2026-11-27 (under 6 minutes of device time for steps 1-5):
#   1. carry .dali-parts/dali-part-00, copy it to /tmp/dali-parts, then
#      GPU_CHECK_STEPS="build tests_cuda bench_ops bench_region" (~3 min);
#   2-4. each within 30 s of the last: carry dali-part-01 .. 03 and copy it to /tmp/dali-parts;
#   5. carry the last part, copy it, then DALI_SHA256=<sum of the whole archive>
#      GPU_CHECK_STEPS="dali dali_breakdown train_bench" (~3.5 min).
# A lease without DALI, as it ran on 2026-11-27 (eleventh session, 340 s, then 328 s for the second):
#   timeout 525 bash -c 'GPU_CHECK_STEPS="build tests_cuda tests_cuda_train train_bench" \
#     bash benchmarks/gpu_check.sh /tmp/out/a; GPU_CHECK_STEPS="bench_region breakdown" \
#     bash benchmarks/gpu_check.sh /tmp/out/b'; tar czf "$OUT/gpu-check.tgz" -C /tmp out
#   timeout 400 env GPU_CHECK_STEPS="train_bench_compile" bash benchmarks/gpu_check.sh /tmp/out/c
# Not yet run on a GPU (2026-11-28): bench_loader and train_bench with the uint8 handover and
# 32-batch epochs (see RESULTS.md; ~1.5 + 1.5 min), dali_breakdown, the region ops' vector kernels
# (tests/test_region_vector.py in tests_cuda; bench_region times them beside the element kernels)
# and DALI since the sampling ops; tests_cuda_train now also restores RNG states from a checkpoint
# loaded onto the GPU (a GPU --resume crashed before 2026-11-28). The steps' own limits add up to
# more than a call may run: bound the whole and tar what there is. Next lease without DALI:
#   timeout 520 env GPU_CHECK_STEPS="build tests_cuda tests_cuda_train bench_region bench_loader train_bench" \
#     bash benchmarks/gpu_check.sh /tmp/out; tar czf "$OUT/gpu-check.tgz" -C /tmp out
# (~7 min, timeout_s 560), then at once, still warm, "train_bench_compile" (~5.5 min).
# Give OUTDIR under /tmp and tar it into the folder that comes back (few files return per call).
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_check.sh OUTDIR}")   # (before the cd below)
mkdir -p "$out"
cd "$(dirname "$0")/.."
failed=()

# GPU_CHECK_STEPS="build tests_cuda ..." runs only the named steps (default: all, in this order).
only=${GPU_CHECK_STEPS:-}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then return; fi
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s"
  tail -n 25 "$out/$name.log"
  [ $rc -eq 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$out/torch.txt"

# Without TORCH_CUDA_ARCH_LIST the build targets the visible GPU only, which halves compile time.
step build 240 env MAX_JOBS=${MAX_JOBS:-16} python -m pip install --no-build-isolation --no-deps -e .
# Only the op test files: the rest import packages (pycocotools, opencv-contrib) the GPU image lacks.
step tests_cuda 150 python -m pytest -q -m cuda -p no:cacheprovider tests/test_roi_align.py tests/test_region_ops.py \
  tests/test_region_vector.py tests/test_region_stage.py tests/test_region_reuse.py tests/test_samplers.py tests/test_optim.py tests/test_batch.py \
  tests/test_cpu_loader.py
# The training step's CUDA tests (no host synchronisation in a step; the loss read through an event),
# apart: if the trainer's imports fail on the GPU image, the op tests above still run.
step tests_cuda_train 120 python -m pytest -q -m cuda -p no:cacheprovider \
  tests/test_trainer.py::test_host_copy_waits_for_its_copy_and_not_for_later_work \
  tests/test_trainer.py::test_training_step_never_waits_for_the_gpu \
  tests/test_checkpoint.py::test_rng_state_restores_from_a_checkpoint_loaded_onto_the_gpu
step bench_ops 60 python benchmarks/throughput.py --section ops --device cuda --json "$out/ops.json"
step bench_region 180 python benchmarks/throughput.py --section region --device cuda --json "$out/region.json"
# The CPU loader on the GPU host: against the PIL anchor, and delivering to the GPU with the uint8
# handover against float32 views (benchmarks/sections/loader.py).
step bench_loader 180 python benchmarks/throughput.py --section loader --device cuda --backend cpu \
  --json "$out/loader.json"
# Where the time goes (torch.profiler): the region stage's kernels and the step's phases.
step breakdown 180 python benchmarks/breakdown.py --device cuda
# DALI is installed from carried wheel parts (see gpu_check_dali.sh), then the train benchmark runs
# the full step fed by every loader backend that imports (the CPU loader, and DALI once installed)
# against the model-only ceiling.
step dali 300 bash benchmarks/gpu_check_dali.sh "${DALI_PARTS:-.dali-parts}" "$out/dali"
# Where the DALI graph's time goes: images/s of the graph cut after each stage (source, decode,
# resizes, colour, normalisation), of the loader's Batch and of the loader + region stage (~1 min).
step dali_breakdown 180 env PYTHONPATH="${DALI_SITE:-/tmp/dali-site}${PYTHONPATH:+:$PYTHONPATH}" \
  python benchmarks/breakdown.py --what dali --device cuda
step train_bench 300 env PYTHONPATH="${DALI_SITE:-/tmp/dali-site}${PYTHONPATH:+:$PYTHONPATH}" \
  python benchmarks/throughput.py --section train --device cuda --backend both --json "$out/train.json"
# The same step with torch.compile of the methods' forward (compiling takes minutes: not in the
# default groups; run it alone when a lease has the time).
step train_bench_compile 540 python benchmarks/throughput.py --section train --device cuda --backend cpu \
  --compile --json "$out/train_compile.json"
# A short main job on the GPU, stopped and resumed, without selective search or O-KNN (see the script).
step train 300 bash benchmarks/gpu_check_train.sh "$out/train"

echo "failed steps: ${failed[*]:-none}" | tee "$out/summary.txt"
[ ${#failed[@]} -eq 0 ]
