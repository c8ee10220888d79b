#!/usr/bin/env bash
# The DALI part of the GPU check: install NVIDIA DALI from wheel parts carried to a GPU host that has no
# network, then run the DALI tests (the GPU graph included) and the loader benchmark (DALI's GPU graph
# against the CPU loader, same workers, same run).
#
#   usage: benchmarks/gpu_check_dali.sh [PARTS_DIR] [OUT_DIR]
#     PARTS_DIR  folder with the dali-part-NN files: where pip works, ../shared/tools/dali-wheels-in-parts.sh
#                DIR makes them (DALI and the wheels it needs that a torch machine lacks), or
#                  pip download nvidia-dali-cuda130 -d W && tar -C W -cf - . | split -b 62M -d -a 2 - dali-part-
#                (the wheels at the tar's top level; wheels of packages the machine already imports,
#                numpy for one, are left out of the install so they cannot shadow its own)
#                (default: $DALI_PARTS, else .dali-parts in the repository root)
#     OUT_DIR    where the logs and the benchmark JSON go (default: $OUT, else ./gpu-check-out)
#   environment: DALI_SHA256  sha256sum of the whole tar, before it was cut (checked
#                             when set); DALI_SITE  install folder (default /tmp/dali-site)
#
# The parts (about 0.4 GB together) may arrive over several calls: each call moves the parts it finds
# into /tmp/dali-parts, which lives as long as the machine. While the archive is incomplete the script
# says how many parts it holds and exits 3; once complete it installs the wheels (once) and runs the
# checks. It assumes d3ssl's CUDA build is in place (gpu_check.sh builds it) and builds it otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
parts=${1:-${DALI_PARTS:-.dali-parts}}
out=${2:-${OUT:-gpu-check-out}}
site=${DALI_SITE:-/tmp/dali-site}
stage=/tmp/dali-parts
mkdir -p "$out" "$stage"
py=python3

if ! PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" $py -c "import nvidia.dali" 2>/dev/null; then
  if [ -d "$parts" ]; then
    for f in "$parts"/dali-part-*; do
      [ -e "$f" ] && [ ! -e "$stage/$(basename "$f")" ] && cp "$f" "$stage/"
    done
  fi
  n=$(ls "$stage"/dali-part-* 2>/dev/null | wc -l)
  if [ "$n" -eq 0 ]; then
    echo "gpu_check_dali: no DALI wheel parts in $parts or $stage; where pip works, make them with" \
         "'pip download nvidia-dali-cuda130 -d W && tar -C W -cf - . | split -b 62M -d -a 2 - dali-part-'" \
         "in a folder, and carry that folder as $parts" >&2
    exit 3
  fi
  cat "$stage"/dali-part-* > /tmp/dali-all.tar
  if ! tar -tf /tmp/dali-all.tar > /dev/null 2>&1; then
    echo "gpu_check_dali: $n part(s) in $stage, the archive is not complete yet: carry the next ones" >&2
    exit 3
  fi
  if [ -n "${DALI_SHA256:-}" ] && [ "$(sha256sum /tmp/dali-all.tar | cut -d' ' -f1)" != "$DALI_SHA256" ]; then
    echo "gpu_check_dali: the joined parts do not match DALI_SHA256; a part is damaged or out of order" >&2
    exit 4
  fi
  rm -rf /tmp/dali-wheels && mkdir -p /tmp/dali-wheels && tar -xf /tmp/dali-all.tar -C /tmp/dali-wheels
  # Only the wheels of packages this Python cannot import yet: a second numpy (or torch, ...) in
  # $site would come first on PYTHONPATH and shadow the one torch was built against.
  wheels=()
  for w in /tmp/dali-wheels/*.whl; do
    mod=$(basename "$w" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
    case "$mod" in nvidia_*) wheels+=("$w"); continue ;; esac   # namespace packages: always
    if $py -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$mod') else 1)" 2>/dev/null; then
      echo "gpu_check_dali: $(basename "$w"): '$mod' is already installed here, left out"
    else
      wheels+=("$w")
    fi
  done
  $py -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" \
    || { echo "gpu_check_dali: installing the DALI wheels failed" >&2; exit 4; }
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
$py -c "import nvidia.dali as d; print('DALI', d.__version__)" || exit 4

if ! $py -c "import d3ssl, sys; sys.exit(0 if d3ssl.cuda_kernels_available() else 1)" 2>/dev/null; then
  echo "gpu_check_dali: building d3ssl with its CUDA kernels"
  TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=${MAX_JOBS:-16} $py setup.py build_ext --inplace > "$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; exit 5; }
fi

status=0
# The CPU-only graph's tests run in CI; here the GPU graph's (DALI_TESTS="" runs them all: slower, as
# on a machine with a GPU every loader's source workers start with spawn).
echo "== DALI tests ${DALI_TESTS--m cuda}"
PYTHONUNBUFFERED=1 $py -m pytest -q -rs ${DALI_TESTS--m cuda} tests/test_dali.py 2>&1 | tee "$out/test_dali.log" || status=1

echo "== loader benchmark: DALI GPU graph vs the CPU loader"
# (From a script file, not stdin: the GPU graph's source workers start with spawn, which re-imports
# the main module from its path.)
PYTHONUNBUFFERED=1 $py benchmarks/throughput.py --section loader --device cuda --backend dali \
  --json "$out/loader_dali.json" 2>&1 | tee "$out/loader_dali.log" || status=1
exit $status
