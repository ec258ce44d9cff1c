#!/usr/bin/env bash
# The GPU check: builds the `cuda` preset, runs every op on the CUDA backend against the CPU (forward and
# backward, fp32, the op tests' tolerances), the CPU-against-GPU training parity tests (dense model, AdamW and
# Muon, a few steps; bf16 tensor-core mode for closeness), the NCCL communicator tests, and the throughput run
# (tokens/s and MFU against the 989 TFLOP/s bf16 dense peak). Writes a summary (markdown) and exits non-zero if
# any check failed.
#
# Usage: launch/gpu-check.sh [--bin DIR] [--summary FILE] [--steps N]
#   --bin DIR   use binaries already built in DIR (a build-cuda tree, or a folder unpacked from
#               launch/pack-gpu-check.sh, whose lib/ holds their libraries) instead of building
#   --summary   where to write the summary (default: gpu-check-summary.md)
#   --steps     timed training steps per throughput configuration (default 5)
set -uo pipefail
cd "$(dirname "$0")/.."
bin="" summary="gpu-check-summary.md" steps=5
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --summary) summary="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    *) echo "gpu-check: unknown argument $1 (--bin DIR, --summary FILE, --steps N)" >&2; exit 2 ;;
  esac
done
if [ -z "$bin" ]; then
  launch/build-cuda.sh || exit 1
  bin=build-cuda
fi
find_bin() {  # a binary in a build tree (tests/, tests/parallel/, bench/) or a flat folder
  for p in "$bin/$1" "$bin/tests/$1" "$bin/tests/parallel/$1" "$bin/bench/$1"; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
}
# A packed folder brings its libraries; the CUDA ones come from the machine (toolkit or driver).
[ -d "$bin/lib" ] && export LD_LIBRARY_PATH="$bin/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export TESSERA_REQUIRE_CUDA=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} OMP_WAIT_POLICY=passive
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
failed=0
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2 || true
  echo '```'
  echo
  echo "| check | result |"
  echo "|---|---|"
} >"$summary"
for t in test_ops test_v4_moe_ops test_v4_mhc_ops test_v4_attention_ops test_decode_ops test_cuda_training \
         test_cuda_v4_training test_nccl_communicator; do
  exe=$(find_bin $t)
  if [ -z "$exe" ]; then echo "| $t | not built |" >>"$summary"; failed=1; continue; fi
  log=$(mktemp)
  start=$SECONDS
  "$exe" --gtest_brief=1 >"$log" 2>&1
  rc=$?
  secs=$((SECONDS - start))
  cat "$log"
  passed=$(grep -oE "\[  PASSED  \] [0-9]+" "$log" | grep -oE "[0-9]+$")
  nskip=$(grep -oE "\[  SKIPPED \] [0-9]+" "$log" | grep -oE "[0-9]+$")
  res="${passed:-0} passed, ${nskip:-0} skipped (${secs} s)"
  [ $rc -eq 0 ] || { failed=1; res="**FAILED** (exit $rc): $res; $(grep -m3 -E 'Failure|error|rror:' "$log" | tr '\n|' ' /' | cut -c1-300)"; }
  echo "| $t | $res |" >>"$summary"
  rm -f "$log"
done
exe=$(find_bin gpu_throughput)
{
  echo
  echo "Throughput (\`gpu_throughput $steps\`):"
  echo
  echo '```'
} >>"$summary"
if [ -n "$exe" ]; then
  "$exe" "$steps" 2>&1 | tee -a "$summary"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
else
  echo "gpu_throughput not built" >>"$summary"
  failed=1
fi
echo '```' >>"$summary"
echo
echo "gpu-check: summary in $summary"
cat "$summary"
exit $failed
