#!/usr/bin/env bash
# Builds the `cuda` preset (CPU + CUDA backend + NCCL communicator) into build-cuda/ and fails on any compiler
# warning, host or device. CI runs it on every submission (GPU code always compiles); launch/gpu-check.sh uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
command -v nvcc >/dev/null || { echo "build-cuda: no CUDA toolkit (nvcc) found; install it or set PATH" >&2; exit 1; }
cmake --preset cuda >/dev/null
log=$(mktemp)
if ! cmake --build build-cuda -j"$(nproc)" "$@" >"$log" 2>&1; then
  grep -E "error" -A5 "$log" | head -60 >&2
  echo "build-cuda: build failed" >&2
  rm -f "$log"
  exit 1
fi
if grep -qi "warning:\|warning #" "$log"; then
  grep -i "warning:\|warning #" -A3 "$log" | head -60 >&2
  echo "build-cuda: the CUDA build has warnings (above)" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
echo "build-cuda: build-cuda/ built without warnings"
