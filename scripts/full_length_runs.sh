#!/usr/bin/env bash
# Full-length runs of the tutorials' recipes in both frameworks, one process per run, for RESULTS.md.
# Each run is `parity train MODEL --framework FW --seed S` with the model's own recipe (its epochs, batch, optimizer,
# early stopping). A finished run (its history.json has the final test accuracy) is skipped and an interrupted one is
# resumed from its last checkpoint, so the script can be stopped and started again.
#
#   bash scripts/full_length_runs.sh OUT_DIR "SEEDS" MODEL...
#   bash scripts/full_length_runs.sh runs_full "0 1 2" convpool lenet_a
#   .venv/bin/python scripts/accuracy_table.py runs_full        # the table, mean +- std, Welch CI per model
#   PARITY_TRAIN_ARGS="--epochs 2" bash scripts/full_length_runs.sh runs_2ep "0 1 2 3 4" cnn   # a shorter recipe
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 OUT_DIR \"SEEDS\" MODEL..." >&2
  exit 2
fi
out=$1
seeds=$2
shift 2
parity=${PARITY:-.venv/bin/parity}
for model in "$@"; do
  for seed in $seeds; do
    for fw in tf torch; do
      history="$out/$model/$fw/seed$seed/history.json"
      resume=()
      if [ -f "$history" ]; then
        if python3 -c 'import json, sys; sys.exit(0 if "test_acc" in json.load(open(sys.argv[1])) else 1)' "$history"; then
          echo "skip $model $fw seed $seed (finished)"
          continue
        fi
        resume=(--resume)
      fi
      echo "== $(date -u +%FT%TZ) $model $fw seed $seed ${resume[*]:-}"
      # shellcheck disable=SC2086  # PARITY_TRAIN_ARGS: extra `parity train` options, word-split on purpose
      "$parity" train "$model" --framework "$fw" --seed "$seed" --out "$out" --no-progress ${PARITY_TRAIN_ARGS:-} \
        "${resume[@]}"
    done
  done
done
