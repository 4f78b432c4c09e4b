#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# One GPU session of diffrepro: build for this GPU's architecture only, run the selftest, the CUDA
# tests, the benchmark at the papers' sizes and the split-precision error table, and write every
# log and JSON into one folder. Designed to finish in under 8 minutes on one H100/H200.
#
# Usage: scripts/gpu_check.sh [OUTDIR]        (default: gpu_check_<UTC time>)
#   PYTHON=/path/to/python   an interpreter whose torch sees the GPU (default: .venv/bin/python if
#                            present, else python3). The machine may be offline: nothing is
#                            downloaded unless the build needs a missing build dependency.
#   SKIP_BUILD=1             reuse the installed build (e.g. for the rerun after tuning).
#
# Time budget (each step runs under `timeout`; a step that overruns is recorded as failed and the
# script moves on, so the whole run is bounded by the sum, 7 min 30 s, plus interpreter start-ups):
#   build   150 s  one architecture (sm_XY-real from nvidia-smi), parallel nvcc, no PTX fan-out
#   selftest 75 s  small real-data table (~100 checks of a few ms) + the papers' sizes
#                  (float64 oracle GEMMs: ~160 GFLOP and ~2 TFLOP at float64 tensor-core rates)
#   tests    60 s  the tests that run on the cuda device fixture or carry the cuda marker
#   bench   120 s  2 denoiser + 2 search workloads x 8 implementations x 6 calls; the slowest call
#                  is nn_search 10,000 x 1,000,000 x 512 (10 TFLOP: ~0.2-1 s per call)
#   split    45 s  the split-precision error table on real tensor cores (float64 oracle on CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PATH="/usr/local/cuda/bin:$PATH"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
T0=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a timeout, logs to OUT/NAME.log
  local name=$1 budget=$2
  shift 2
  local t=$(date +%s)
  echo "== $name (budget ${budget}s): $*" | tee -a "$SUMMARY"
  timeout --signal=INT --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [[ $rc -eq 124 || $rc -eq 130 ]] && status="TIMED OUT"
  [[ $rc -ne 0 && $status == ok ]] && status="FAILED (exit $rc)"
  echo "   $name: $status in $(( $(date +%s) - t ))s, log $OUT/$name.log" | tee -a "$SUMMARY"
}

{
  date -u
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv
  git rev-parse HEAD
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} >"$OUT/machine.txt" 2>&1
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
if [[ -z "$CAP" ]]; then
  echo "gpu_check: no GPU found by nvidia-smi; nothing to measure" | tee -a "$SUMMARY"
  exit 1
fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  step build 150 env DIFFREPRO_CUDA=ON DIFFREPRO_CUDA_EMULATOR=OFF CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PYTHON" -m pip install -q --no-build-isolation -C cmake.define.CMAKE_CUDA_ARCHITECTURES="${CAP}-real" -e .
fi
"$PYTHON" -m diffrepro info >"$OUT/build_info.json" 2>&1

step selftest 75 "$PYTHON" -m diffrepro selftest --device cuda --sizes all --json "$OUT/selftest.json"
step tests 60 "$PYTHON" -m pytest -q -x tests -k "cuda or blas_engine or engine_choice" -p no:cacheprovider
step bench 120 "$PYTHON" -m diffrepro bench --device cuda --sizes paper --rounds 5 --json "$OUT/bench.json"
DATA=${DIFFREPRO_TEST_DATA:-../shared/data}
if [[ -f "$DATA/cifar10-train-subset.npz" ]]; then
  step split 45 "$PYTHON" scripts/split_precision_error.py --device cuda --data "$DATA/cifar10-train-subset.npz" \
    --json "$OUT/split_precision.json"
else
  echo "== split: skipped (no $DATA/cifar10-train-subset.npz)" | tee -a "$SUMMARY"
fi
echo "gpu_check: done in $(( $(date +%s) - T0 ))s; results in $OUT" | tee -a "$SUMMARY"
grep -q -E "FAILED|TIMED OUT" "$SUMMARY" && exit 1
exit 0
