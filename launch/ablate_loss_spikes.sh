#!/usr/bin/env bash
# Loss-spike ablation (docs/ablations/loss-spikes.md): every variant of recipes/ablations/loss-spikes/ x seed,
# then the report with its plots.
#   launch/ablate_loss_spikes.sh [short|long] [SEED ...]
#     short (default): seeds 0 1, the recipes as written (about 10 minutes on 2 cores)
#     long: seeds 0-4, 1200 steps of 8 x 128 tokens (not run for the committed report; hours on 2 cores)
#   VARIANTS="baseline ar" launch/ablate_loss_spikes.sh   runs a subset (an unknown name is an error)
# Runs: runs/ablations/loss-spikes/<variant>-s<seed> (replaced). Exits non-zero on a failed run, an unknown
# variant or mode, or a determinism mismatch. Skips (exit 0) when ../shared/data/tinyshakespeare.txt is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
py=.venv/bin/python
[ -x "$py" ] || { echo "ablate_loss_spikes: $py missing (run launch/setup.sh)" >&2; exit 1; }
exec "$py" bench/loss_spike_ablation.py "$@"
