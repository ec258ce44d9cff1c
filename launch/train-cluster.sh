#!/usr/bin/env bash
# Data-parallel pretraining over several machines listed in an OpenMPI hostfile ("node1 slots=8" per line).
# Every machine needs this repository built at the same path and the run directory on a shared filesystem
# (rank 0 writes it; every rank reads checkpoints from it on --resume).
#   launch/train-cluster.sh hosts.txt 16 recipes/pretrain/shakespeare-dense.toml --set training.grad_accum=16
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then
  echo "usage: launch/train-cluster.sh HOSTFILE NP RECIPE|--resume RUN [tessera train arguments...]" >&2
  exit 2
fi
hostfile=$1 np=$2
shift 2
[ -f "$hostfile" ] || { echo "train-cluster: no hostfile '$hostfile'" >&2; exit 2; }
threads=${OMP_NUM_THREADS:-4}
exec mpirun --hostfile "$hostfile" -np "$np" --map-by slot --bind-to none \
  -x OMP_NUM_THREADS="$threads" -x OMP_WAIT_POLICY=passive -x PATH -x LD_LIBRARY_PATH \
  "$PWD/build/bin/tessera" train "$@"
