#!/usr/bin/env bash
# Packs what launch/gpu-check.sh runs (the GPU tests and gpu_throughput of a `cuda` build) with the shared
# libraries they need that a bare CUDA machine may lack (OpenBLAS, HDF5, OpenMP, OpenMPI, ...), so that the check
# runs on a GPU machine that has only the NVIDIA driver and the CUDA toolkit (cuBLAS, NCCL):
#   launch/pack-gpu-check.sh gpu-check.tgz            # here: build with launch/build-cuda.sh, then pack
#   mkdir g && tar xzf gpu-check.tgz -C g && launch/gpu-check.sh --bin g   # there
# The C library, libstdc++ and the CUDA libraries are not packed: the GPU machine's own are used (binaries built on
# an older Debian run on newer distributions).
set -euo pipefail
cd "$(dirname "$0")/.."
out_tgz=${1:-gpu-check.tgz}
launch/build-cuda.sh
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/lib"
for t in tests/test_ops tests/test_v4_moe_ops tests/test_v4_mhc_ops tests/test_v4_attention_ops tests/test_decode_ops \
         tests/test_cuda_training tests/test_cuda_v4_training tests/parallel/test_nccl_communicator bench/gpu_throughput; do
  [ -x "build-cuda/$t" ] || { echo "pack-gpu-check: build-cuda/$t was not built" >&2; exit 1; }
  cp "build-cuda/$t" "$stage/"
done
system='/(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux[^/]*|libcuda|libcublas[^/]*|libnccl)\.so'
for b in "$stage"/*; do
  [ -f "$b" ] && ldd "$b" | awk '/=> \//{print $3}'
done | sort -u | grep -vE "$system" | while read -r lib; do cp -L "$lib" "$stage/lib/"; done
tar czf "$out_tgz" -C "$stage" .
echo "pack-gpu-check: $out_tgz ($(du -h "$out_tgz" | cut -f1)): $(ls "$stage" | grep -vc '^lib$') binaries, $(ls "$stage/lib" | wc -l) libraries"
