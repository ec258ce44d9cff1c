#!/usr/bin/env bash
# Failure handling: one rank of a data-parallel `mpirun -np 2 tessera train` is killed (SIGKILL) in the middle of
# training; the job must exit non-zero within 60 seconds (no rank left waiting in a collective) and say which
# rank failed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
export OMP_WAIT_POLICY=passive OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
make_corpus "$WORK/corpus.txt" 400
write_recipe "$WORK/r.toml" "$WORK/corpus.txt" "$WORK/R"

# The job's tessera processes, found through /proc (no dependence on procps' pgrep).
job_pids() {
  local d
  for d in /proc/[0-9]*; do
    tr '\0' ' ' < "$d/cmdline" 2>/dev/null | grep -qF "$TESSERA train $WORK/r.toml" && echo "${d#/proc/}"
  done
  return 0
}

step "start a long data-parallel run"
mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/r.toml" --set training.steps=100000 eval.every=0 \
  checkpoint.every=0 metrics.log_every=1 parallel.dp=2 training.grad_accum=2 > "$WORK/job.out" 2> "$WORK/job.err" &
job=$!
# Wait for training to be under way (a few steps in metrics.jsonl), then find rank 1 by its environment.
for _ in $(seq 1 600); do
  [[ -f $WORK/R/metrics.jsonl && $(wc -l < "$WORK/R/metrics.jsonl") -ge 3 ]] && break
  kill -0 $job 2>/dev/null || { cat "$WORK/job.err" >&2; fail "the job ended before training started"; }
  sleep 0.1
done
victim=""
for pid in $(job_pids); do
  if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1"; then victim=$pid; fi
done
[[ -n $victim ]] || { kill $job; fail "could not find the process of rank 1"; }

step "kill rank 1 (pid $victim) with SIGKILL"
start=$SECONDS
kill -9 "$victim"
rc=0
for _ in $(seq 1 600); do
  kill -0 $job 2>/dev/null || break
  sleep 0.1
done
if kill -0 $job 2>/dev/null; then
  for pid in $(job_pids); do kill -9 "$pid" 2>/dev/null || true; done
  kill -9 $job || true
  fail "the job was still running 60 s after rank 1 died"
fi
wait $job || rc=$?
elapsed=$((SECONDS - start))
echo "job exited with status $rc after ${elapsed} s"
[[ $rc -ne 0 ]] || check_failed "the job exited with status 0 after a rank was killed"
if grep -hiE "rank 1" "$WORK/job.err" "$WORK/job.out" | head -2 | sed 's/^/  job says: /' | grep .; then :; else
  cat "$WORK/job.err" >&2
  check_failed "the job's output does not name rank 1"
fi
[[ -z $(job_pids) ]] || check_failed "processes of the job are still alive: $(job_pids | tr '\n' ' ')"
finish
