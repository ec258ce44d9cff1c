#!/usr/bin/env bash
# Data-parallel pretraining on one machine: NP processes of `tessera train` under mpirun, each with an equal
# share of the cores for its OpenMP threads. Extra arguments go to `tessera train` (a recipe, --set, --resume).
#   launch/train-local.sh 4 recipes/pretrain/shakespeare-dense.toml --set training.grad_accum=4
# The recipe's [parallel] section (or --set parallel.dp=...) must fit NP ranks; dp = -1 (the default) takes
# them all. training.grad_accum must be a multiple of dp (docs/parallelism.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: launch/train-local.sh NP RECIPE|--resume RUN [tessera train arguments...]" >&2
  exit 2
fi
np=$1
shift
[ -x build/bin/tessera ] || { cmake --preset default >/dev/null && cmake --build build -j"$(nproc)" --target tessera; }
threads=$(( $(nproc) / np ))
[ "$threads" -ge 1 ] || threads=1
extra=()
[ "$np" -gt "$(nproc)" ] && extra+=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Passive OpenMP waiting: ranks share the machine, and spinning threads would starve each other.
exec mpirun -np "$np" "${extra[@]}" --bind-to none -x OMP_NUM_THREADS="$threads" -x OMP_WAIT_POLICY=passive \
  build/bin/tessera train "$@"
