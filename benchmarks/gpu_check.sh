#!/usr/bin/env bash
# One GPU check that fits ten minutes on one GPU (see benchmarks/gpu_check.py for what it compares).
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--dry-run] [more gpu_check.py options]
#
# 1. installs what the machine lacks, offline, from a wheel folder brought along (--wheels DIR, or
#    $BENCHSUITE_WHEELS): the GPU machine has torch and no network;
# 2. runs the tests marked `cuda` (they skip without CUDA);
# 3. runs benchmarks/gpu_check.py: every method on CUDA against the CPU (fp32), under amp and bf16
#    (finite losses, GradScaler, host syncs per step), and `bench` on ViT-B-16 shapes; writes
#    gpu_check.json, gpu_check.md and bench/<method>.json into $OUT (default ./gpu-check-out).
# Without CUDA, or with --dry-run, the same comparisons run CPU against CPU on small shapes.
#
# Preparing the wheel folder, on a machine with network and the GPU machine's Python version:
#   pip wheel --no-deps --wheel-dir wheels $(python benchmarks/gpu_check.py --list-requirements)
#   pip download --no-deps --dest wheels "torchvision==<the release matching the GPU machine's torch>" \
#       --index-url https://download.pytorch.org/whl/<its CUDA tag, e.g. cu128>
#   pip download --no-deps --dest wheels "setuptools>=64"
# (--list-requirements prints every distribution benchsuite[test] needs as installed here, except torch,
# its CUDA libraries and torchvision, which must match the GPU machine's torch, not this machine's:
# torch 2.11 pairs with torchvision 0.26.)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
wheels="${BENCHSUITE_WHEELS:-}"
rest=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    *) rest+=("$1"); shift ;;
  esac
done
out="${OUT:-$root/gpu-check-out}"
mkdir -p "$out"
cd "$root"
start=$(date +%s)

# 1. dependencies: benchsuite (editable, with its entry points) and its test extras, never from the network
if ! python -c "import benchsuite, open_clip, torchvision, pluggy, pytest" 2>/dev/null \
    || ! python -c "from importlib.metadata import version; version('benchsuite')" 2>/dev/null; then
  if [[ -z "$wheels" ]]; then
    echo "gpu_check: benchsuite or its dependencies are missing and no wheel folder was given; pass --wheels DIR" \
         "(how to prepare it: the header of $0)" >&2
    exit 2
  fi
  echo "gpu_check: installing from $wheels (offline)"
  python -m pip install --no-index --find-links "$wheels" --quiet "setuptools>=64" || true
  python -m pip install --no-index --find-links "$wheels" --no-build-isolation --quiet -e ".[test]"
fi
python -c "import torch; print('gpu_check: torch', torch.__version__, '| CUDA', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

# 2. the CUDA-marked tests (a failure is reported, the check goes on)
tests=0
timeout 180 python -m pytest -m cuda tests -q -p no:cacheprovider 2>&1 | tee "$out/pytest-cuda.txt" | tail -3 || tests=$?

# 3. parity, precision, bench
checks=0
python "$here/gpu_check.py" --out "$out" ${rest[@]+"${rest[@]}"} || checks=$?

echo "gpu_check: done in $(( $(date +%s) - start )) s; tests exit $tests, checks exit $checks; output in $out"
[[ $tests -eq 0 || $tests -eq 5 ]] && [[ $checks -eq 0 ]]
