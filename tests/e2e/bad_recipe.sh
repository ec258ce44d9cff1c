#!/usr/bin/env bash
# Bad recipes, bad --set overrides and bad data files: `tessera train` must exit non-zero with a message that
# names the file, the line and the key (or the --set argument, or the data file), and must not write into a
# new run directory or change an existing one.
set -euo pipefail
source "$(dirname "$0")/common.sh"

make_corpus "$WORK/corpus.txt" 400
NEW="$WORK/new"  # run directory of the runs that must not start
write_recipe "$WORK/base.toml" "$WORK/corpus.txt" "$NEW"

# expect_no_run_files NAME: the failed run left no files in its run directory (an empty folder is tolerated).
expect_no_run_files() {
  if [[ -d $NEW ]] && [[ -n $(find "$NEW" -type f) ]]; then
    find "$NEW" -type f >&2
    check_failed "$1: the failed run wrote files into $NEW"
    rm -rf "$NEW"
  fi
}

# variant NAME SED_EXPR: a copy of the base recipe with one edit; prints its path.
variant() {
  local out="$WORK/$1.toml"
  sed "$2" "$WORK/base.toml" > "$out"
  cmp -s "$out" "$WORK/base.toml" && fail "variant $1: the edit '$2' changed nothing"
  echo "$out"
}
line_of() { grep -n -- "$2" "$1" | head -n 1 | cut -d: -f1; }

step "a misspelled key that replaces a required one ([training] stpes = 10, no steps)"
f=$(variant typo_required 's/^steps = 10$/stpes = 10/')
expect_fail typo_required "$f:$(line_of "$f" '^stpes')" "stpes" "training.steps" -- "$TESSERA" train "$f"
expect_no_run_files typo_required

step "an unknown key beside the right one ([training] stpes = 3 and steps = 10)"
f=$(variant typo_extra 's/^steps = 10$/steps = 10\nstpes = 3/')
expect_fail typo_extra "$f:$(line_of "$f" '^stpes')" "unknown key 'training.stpes'" "did you mean 'training.steps'" \
  -- "$TESSERA" train "$f"
expect_no_run_files typo_extra

step "wrong type: steps = \"ten\""
f=$(variant wrong_type 's/^steps = 10$/steps = "ten"/')
expect_fail wrong_type "$f:$(line_of "$f" '^steps')" "training.steps" "expected an integer" -- "$TESSERA" train "$f"
expect_no_run_files wrong_type

step "out of range: steps = 0"
f=$(variant range_int 's/^steps = 10$/steps = 0/')
expect_fail range_int "$f:$(line_of "$f" '^steps')" "training.steps" "must be >= 1" -- "$TESSERA" train "$f"
expect_no_run_files range_int

step "out of range: lr = -1.0"
f=$(variant range_double 's/^lr = 3e-3$/lr = -1.0/')
expect_fail range_double "$f:$(line_of "$f" '^lr')" "optimizer.lr" "-1.0" -- "$TESSERA" train "$f"
expect_no_run_files range_double

step "out of range: seq_len above the model's max_seq_len (64)"
f=$(variant range_seq 's/^seq_len = 64$/seq_len = 65/')
expect_fail range_seq "$f:$(line_of "$f" '^seq_len')" "training.seq_len" "[1, 64]" -- "$TESSERA" train "$f"
expect_no_run_files range_seq

step "--set of a key that does not exist"
expect_fail set_unknown "--set training.stepz=3" "unknown key 'training.stepz'" "training.steps" \
  -- "$TESSERA" train "$WORK/base.toml" --set training.stepz=3
expect_no_run_files set_unknown

step "--set of the wrong type"
expect_fail set_type "--set training.steps=ten" "training.steps" "expected an integer" \
  -- "$TESSERA" train "$WORK/base.toml" --set training.steps=ten
expect_no_run_files set_type

step "missing data file"
expect_fail data_missing "$WORK/no-such-file.txt" "not found" \
  -- "$TESSERA" train "$WORK/base.toml" --set "data.train=[\"$WORK/no-such-file.txt\"]"
expect_no_run_files data_missing

step "empty data file"
: > "$WORK/empty.txt"
expect_fail data_empty "$WORK/empty.txt" "empty" \
  -- "$TESSERA" train "$WORK/base.toml" --set "data.train=[\"$WORK/empty.txt\"]"
expect_no_run_files data_empty

step "missing recipe file"
expect_fail recipe_missing "$WORK/no-such-recipe.toml" -- "$TESSERA" train "$WORK/no-such-recipe.toml"

# The same mistakes against a finished run: `--resume` must fail before touching anything in it.
step "a finished run R for the --resume cases"
write_recipe "$WORK/r.toml" "$WORK/corpus.txt" "$WORK/R"
"$TESSERA" train "$WORK/r.toml" 2> "$WORK/R.log"
[[ -f $WORK/R/checkpoints/step_00000010.h5 ]] || fail "R: no final checkpoint"
snapshot "$WORK/R" > "$WORK/R.before"

step "--resume with an unknown --set key"
expect_fail resume_set_unknown "--set training.stepz=3" "training.stepz" \
  -- "$TESSERA" train --resume "$WORK/R" --set training.stepz=3
expect_unchanged resume_set_unknown "$WORK/R" "$WORK/R.before"

step "--resume with an out-of-range --set"
expect_fail resume_set_range "--set training.batch_size=0" "training.batch_size" \
  -- "$TESSERA" train --resume "$WORK/R" --set training.batch_size=0
expect_unchanged resume_set_range "$WORK/R" "$WORK/R.before"

step "--resume when the data file has gone"
mv "$WORK/corpus.txt" "$WORK/corpus.txt.away"
expect_fail resume_data_missing "$WORK/corpus.txt" "not found" -- "$TESSERA" train --resume "$WORK/R"
expect_unchanged resume_data_missing "$WORK/R" "$WORK/R.before"

step "--resume when the data file is empty"
: > "$WORK/corpus.txt"
expect_fail resume_data_empty "$WORK/corpus.txt" "empty" -- "$TESSERA" train --resume "$WORK/R"
expect_unchanged resume_data_empty "$WORK/R" "$WORK/R.before"

step "--resume when the data changed"
make_corpus "$WORK/corpus.txt" 401
expect_fail resume_data_changed "different data" "$WORK/corpus.txt" -- "$TESSERA" train --resume "$WORK/R"
expect_unchanged resume_data_changed "$WORK/R" "$WORK/R.before"
finish
