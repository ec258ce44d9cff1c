#!/usr/bin/env bash
# The quick start: install dependencies, build, prepare the embedded corpus (Debian's fortunes), train a
# small dense model, print a sample and say where the run and its loss plot are.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup.sh
cmake --preset default >/dev/null
cmake --build build -j"$(nproc)" --target tessera

corpus=runs/data/fortunes.txt
if [ ! -s "$corpus" ]; then
  mkdir -p runs/data
  # Every English fortune file (not the .dat indexes or .u8 links), entries separated by '%' lines.
  find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.*' | sort | while read -r f; do
    cat "$f"; printf '%%\n'
  done > "$corpus.tmp"
  mv "$corpus.tmp" "$corpus"
  echo "prepared $corpus ($(wc -c < "$corpus") bytes)"
fi

run=runs/quickstart
if [ -n "$(ls "$run"/checkpoints 2>/dev/null)" ]; then
  echo "$run already has checkpoints: continuing it (rm -rf $run to start over)"
  build/bin/tessera train --resume "$run"
else
  build/bin/tessera train recipes/pretrain/quickstart.toml
fi
echo
echo "--- sample (tessera sample $run --prompt 'The ' --seed 1) ---"
build/bin/tessera sample "$run" --prompt "The " --max-new-tokens 300 --temperature 0.8 --seed 1
echo "---"
echo "run directory: $run (metrics.jsonl, recipe.toml, checkpoints/)"
echo "loss plot:     $run/loss.png"
