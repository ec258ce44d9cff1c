# Shared helpers for the end-to-end CLI tests; sourced by each test script.
# Every script is called as:  script.sh TESSERA_BINARY PYTHON WORK_ROOT
#   TESSERA_BINARY  the built `tessera` executable
#   PYTHON          an interpreter (h5py and numpy needed only by the checkpoint comparisons)
#   WORK_ROOT       a folder under which the script makes its own fresh temporary directory
# Each script leaves its work directory in place when it fails (the path is printed) and removes it otherwise.

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TESSERA_BINARY PYTHON WORK_ROOT" >&2
  exit 2
fi
# shellcheck disable=SC2034  # TESSERA, TINY: used by the scripts that source this file
TESSERA=$(realpath "$1")
PY=$2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TINY="$REPO/recipes/models/dense-tiny.toml"
mkdir -p "$3"
WORK=$(mktemp -d "$(realpath "$3")/$(basename "$0" .sh).XXXXXX")
# Small, fixed thread count: results must not depend on it, and the tests share a small machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# `tessera train` ends by running $TESSERA_PYTHON launch/plot_metrics.py to draw loss.png; that costs a Python
# start and a matplotlib import per run, so the tests turn it off (cli_smoke turns it back on once).
export TESSERA_PYTHON=true

on_exit() {
  local rc=$?
  if [[ $rc -eq 0 ]]; then
    rm -rf "$WORK"
  elif [[ $rc -ne 77 ]]; then
    echo "FAILED (exit $rc); files kept in $WORK" >&2
  fi
}
trap on_exit EXIT

# fail: a broken precondition; stops the script. check_failed: one failed case; the script goes on with the
# other cases and `finish` exits 1 at the end, so one run reports every failing case.
FAILED_CASES=()
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
check_failed() {
  echo "FAIL: $*" >&2
  FAILED_CASES+=("$1")
}
finish() {
  if [[ ${#FAILED_CASES[@]} -gt 0 ]]; then
    echo "${#FAILED_CASES[@]} failed case(s):" >&2
    printf '  %s\n' "${FAILED_CASES[@]}" >&2
    exit 1
  fi
  echo PASS
}

step() { echo "--- $*"; }

# Options of ckpt_equal.py (--rtol-for REGEX R) that loosen resume_in_layout's checkpoint comparison for some
# tensors; none unless a script sets them.
LOOSER=()

# arithmetic_chat_data N: one-digit arithmetic conversations ($WORK/chat.jsonl, N of them, seed 1) and their chat
# dataset $WORK/chat.h5 (assistant-only loss mask), for the post-training tests.
arithmetic_chat_data() {
  "$TESSERA" data prompts --task arithmetic --difficulty 1 --n "$1" --seed 1 --chat --out "$WORK/chat.jsonl" > /dev/null
  "$TESSERA" data prepare "$WORK/chat.jsonl" --format chat --out "$WORK/chat.h5" > /dev/null 2> "$WORK/prep.log" \
    || { cat "$WORK/prep.log" >&2; fail "data prepare failed"; }
}

# expect_error NAME PATTERN ARGS...: `tessera ARGS` must fail with PATTERN (grep) on stderr; prints the start of the
# message. A success or another message is a failed case.
expect_error() {
  local name=$1 pattern=$2
  shift 2
  if "$TESSERA" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"; then
    check_failed "$name: succeeded"
  elif ! grep -q -- "$pattern" "$WORK/$name.err"; then
    cat "$WORK/$name.err" >&2
    check_failed "$name: message does not match '$pattern'"
  else
    head -c 400 "$WORK/$name.err"; echo
  fi
}

# Exit with ctest's skip code when the interpreter lacks h5py/numpy (the tests that need them say so).
require_h5py() {
  if ! "$PY" -c "import h5py, numpy" 2>/dev/null; then
    echo "SKIP: '$PY' cannot import h5py and numpy (run launch/setup.sh, or configure with -DTESSERA_PYTHON=...)"
    exit 77
  fi
}

# make_corpus FILE [LINES]: deterministic, varied English-like text (about 55 bytes a line).
make_corpus() {
  local out=$1 n=${2:-600}
  awk -v n="$n" 'BEGIN {
    split("the quick brown fox jumps over a lazy dog while model tensor gradient layer attention token " \
          "batch sequence optimizer learning rate weight decay checkpoint resume train sample export " \
          "recipe corpus byte river stone light", w, " ");
    m = length(w);
    for (i = 1; i <= n; i++)
      printf "Line %d: the %s %s %s, and %s number %d.\n", i, w[(i*7)%m+1], w[(i*13)%m+1], w[(i*29)%m+1],
             w[(i*3)%m+1], (i*i)%97;
  }' > "$out"
}

# write_recipe FILE CORPUS RUN_DIR [extra TOML lines appended to the file ...]: a pretraining recipe on the
# tiny model. Keys given in the extra lines must not repeat the ones below (use --set to change those).
write_recipe() {
  local out=$1 corpus=$2 run_dir=$3
  shift 3
  cat > "$out" <<EOF
inherit = "$TINY"

[job]
name = "e2e"
run_dir = "$run_dir"
seed = 1

[data]
train = ["$corpus"]

[training]
steps = 10
batch_size = 8
seq_len = 64

[optimizer]
lr = 3e-3

[eval]
every = 5
batches = 4

[checkpoint]
every = 5

[metrics]
peak_flops = 1e11
EOF
  local line
  for line in "$@"; do echo "$line" >> "$out"; done
}

# finished_run: a finished 10-step run of the tiny model in $WORK/R (checkpoints at steps 5 and 10) on
# $WORK/corpus.txt with recipe $WORK/r.toml; sets CK to its final checkpoint.
finished_run() {
  make_corpus "$WORK/corpus.txt" 400
  write_recipe "$WORK/r.toml" "$WORK/corpus.txt" "$WORK/R"
  step "a finished run R (10 steps, checkpoints at 5 and 10)"
  "$TESSERA" train "$WORK/r.toml" 2> "$WORK/R.log"
  CK="$WORK/R/checkpoints/step_00000010.h5"
  [[ -f $CK ]] || fail "R: no final checkpoint"
}

# expect_fail NAME SUBSTRING... -- COMMAND...: COMMAND must exit non-zero, and its stderr must contain every
# SUBSTRING (fixed strings). The stderr is kept in $WORK/NAME.err.
expect_fail() {
  local name=$1
  shift
  local -a needles=()
  while [[ $# -gt 0 && $1 != "--" ]]; do
    needles+=("$1")
    shift
  done
  [[ $# -gt 0 ]] || fail "expect_fail $name: missing -- before the command"
  shift
  local err="$WORK/$name.err" rc=0
  "$@" > "$WORK/$name.out" 2> "$err" || rc=$?
  if [[ $rc -eq 0 ]]; then
    echo "stdout:" >&2
    cat "$WORK/$name.out" >&2
    check_failed "$name: expected a non-zero exit status from: $*"
    return 0
  fi
  if [[ $rc -eq 126 || $rc -eq 127 ]]; then
    cat "$err" >&2
    fail "$name: could not run the command (exit $rc): $*"
  fi
  if [[ $rc -ge 128 ]]; then
    cat "$err" >&2
    check_failed "$name: the command died with signal $((rc - 128)) instead of reporting an error: $*"
    return 0
  fi
  local s
  for s in "${needles[@]}"; do
    if ! grep -qF -- "$s" "$err"; then
      echo "stderr of: $*" >&2
      cat "$err" >&2
      check_failed "$name: stderr does not mention '$s'"
      return 0
    fi
  done
  echo "ok: $name (exit $rc): $(head -c 300 "$err" | tr '\n' ' ')"
}

# snapshot DIR: one line per file below DIR (path and sha256), sorted; used to prove that nothing changed.
snapshot() {
  (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
}

# expect_unchanged NAME DIR BEFORE_SNAPSHOT_FILE
expect_unchanged() {
  local name=$1 dir=$2 before=$3
  if ! diff <(cat "$before") <(snapshot "$dir") >&2; then
    check_failed "$name: files in $dir changed (diff above: < before, > after)"
  fi
}

# ---- Parallel layouts against one process (data_parallel.sh, expert_parallel.sh, pipeline_parallel.sh).
CKPT_EQUAL="$REPO/tests/e2e/ckpt_equal.py"  # A B: every dataset of two checkpoints bitwise equal
# export OMPI_* for mpirun as root, one thread per rank, passive waits: several ranks share a small machine.
mpi_env() {
  export OMP_WAIT_POLICY=passive OMP_NUM_THREADS=1
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
}

# layout_test_start MODEL [SETTING...]: the start of every layout test: the tiny MODEL (recipes/models/MODEL.toml) on
# a small corpus as $WORK/model.toml, SETS = 20 steps of 4 micro-batches with Muon (checkpoints and held-out
# evaluation every 10) and the SETTINGs, FINAL = the final checkpoint's path in a run directory, and the
# single-process run in $WORK/one.
layout_test_start() {
  STEPS=20
  FINAL=checkpoints/step_$(printf %08d $STEPS).h5
  make_corpus "$WORK/corpus.txt" 400
  TINY="$REPO/recipes/models/$1.toml" write_recipe "$WORK/model.toml" "$WORK/corpus.txt" "$WORK/unused"
  shift
  SETS=(--set "training.steps=$STEPS" training.batch_size=2 training.grad_accum=4 checkpoint.every=10 eval.every=10
        eval.batches=2 optimizer.name=muon "$@")
  step "$STEPS steps of 4 micro-batches in one process"
  "$TESSERA" train "$WORK/model.toml" "${SETS[@]}" job.run_dir="$WORK/one" 2> "$WORK/one.log" \
    || { cat "$WORK/one.log" >&2; fail "the single-process run failed"; }
}

# train_in_layout NAME NP LOG_LINE SETTING...: trains $WORK/model.toml with "${SETS[@]}" and the SETTINGs under
# mpirun -np NP into $WORK/NAME; its log must hold LOG_LINE (a grep pattern; a missing one is a failed case).
train_in_layout() {
  local name=$1 np=$2 line=$3
  shift 3
  step "the same global batch over mpirun -np $np: $*"
  mpirun --oversubscribe -np "$np" "$TESSERA" train "$WORK/model.toml" "${SETS[@]}" job.run_dir="$WORK/$name" "$@" \
    2> "$WORK/$name.log" || { cat "$WORK/$name.log" >&2; fail "$name failed"; }
  grep -q -- "$line" "$WORK/$name.log" || check_failed "$name: the log has no line '$line'"
}

# same_metrics NAME ONE_DIR PARALLEL_DIR STEPS COMM_KIND KEY...: the parallel run logged the same steps as the
# one-process run (1..STEPS, or the same replayed sequence after a rollback), every KEY bitwise equal where the
# one-process run has it (with RTOL set: within RTOL x |one-process value|), and COMM_KIND collectives in every
# step (COMM_KIND "-": no such check); the loss fell. A failure is a failed case.
same_metrics() {
  local name=$1 a=$2 b=$3 steps=$4 kind=$5
  shift 5
  "$PY" - "$a/metrics.jsonl" "$b/metrics.jsonl" "$steps" "$kind" "${RTOL:-0}" "$@" <<'PYEOF' || check_failed "$name: metrics differ"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
b = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
steps, kind, rtol, keys = int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), sys.argv[6:]
errors = []
worst = 0.0
if [r["step"] for r in a] != [r["step"] for r in b] or a[-1]["step"] != steps or len(a) < steps:
    errors.append(f"steps differ: {[r['step'] for r in a]} vs {[r['step'] for r in b]}")
for ra, rb in zip(a, b):
    for key in keys:
        if key not in ra:
            continue
        x, y = ra[key], rb.get(key)
        number = lambda v: isinstance(v, (int, float))
        numbers = lambda v: number(v) or (isinstance(v, list) and all(number(e) for e in v))
        comparable = numbers(x) and numbers(y) and isinstance(x, list) == isinstance(y, list)
        if rtol == 0 or not comparable or (isinstance(x, list) and len(x) != len(y)):
            same = x == y
        else:  # a number, or a list of them (per-layer values) compared element by element
            pairs = zip(x, y) if isinstance(x, list) else [(x, y)]
            rel = max([abs(p - q) / max(abs(p), 1e-30) for p, q in pairs], default=0.0)
            worst, same = max(worst, rel), rel <= rtol
        if not same:
            errors.append(f"step {ra['step']}: {key} {ra[key]} (one process) vs {rb.get(key)} (parallel)")
    if kind != "-" and rb.get("comm", {}).get(kind, [0, 0])[0] <= 0:
        errors.append(f"step {rb['step']}: no {kind} in the parallel run's metrics")
if a[-1]["loss"] >= a[0]["loss"]:
    errors.append(f"loss did not fall: {a[0]['loss']} -> {a[-1]['loss']}")
for e in errors[:10]:
    print("FAIL:", e)
same = "identical" if rtol == 0 else f"within {rtol:g} (worst relative difference {worst:.3g})"
print(f"{len(a)} steps: loss {a[0]['loss']:.4f} -> {a[-1]['loss']:.4f}, every logged value {same}: {not errors}; "
      f"{b[-1].get('comm_bytes', 0)} bytes per step on rank 0: {b[-1].get('comm')}")
sys.exit(1 if errors else 0)
PYEOF
}

# resume_in_layout NAME RECIPE ONE_FINAL "FROM_NP FROM_SETS..." "TO_NP TO_SETS...": trains RECIPE with
# "${SETS[@]}" under mpirun -np FROM_NP with FROM_SETS, stopped after step 10, resumes it under -np TO_NP with
# TO_SETS, and checks that its losses continue the uninterrupted one-process run's (ONE_FINAL's run directory) and
# that its final checkpoint equals ONE_FINAL bitwise (with RTOL set: both within it; LOOSER, an array of
# ckpt_equal.py --rtol-for options, loosens it for some tensors).
resume_in_layout() {
  local name=$1 recipe=$2 one_final=$3
  read -r -a from <<< "$4"
  read -r -a to <<< "$5"
  step "a run stopped at step 10 with ${from[*]:1} resumes with ${to[*]:1}"
  mpirun --oversubscribe -np "${from[0]}" "$TESSERA" train "$recipe" "${SETS[@]}" job.run_dir="$WORK/$name" \
    "${from[@]:1}" --stop-after 10 2> "$WORK/$name-a.log" || { cat "$WORK/$name-a.log" >&2; fail "$name: first part failed"; }
  mpirun --oversubscribe -np "${to[0]}" "$TESSERA" train --resume "$WORK/$name" --set "${to[@]:1}" \
    2> "$WORK/$name-b.log" || { cat "$WORK/$name-b.log" >&2; fail "$name: resumed part failed"; }
  grep -q "resuming from .*step_00000010.h5 at step 10" "$WORK/$name-b.log" \
    || { cat "$WORK/$name-b.log" >&2; check_failed "$name: did not resume from step 10"; return 0; }
  same_metrics "$name" "$(dirname "$(dirname "$one_final")")" "$WORK/$name" $STEPS - loss val_loss
  "$PY" "$CKPT_EQUAL" "$one_final" "$WORK/$name/checkpoints/$(basename "$one_final")" ${RTOL:+--rtol $RTOL} \
    ${LOOSER[@]+"${LOOSER[@]}"} \
    || check_failed "$name: final checkpoint differs from the uninterrupted one-process run"
}
