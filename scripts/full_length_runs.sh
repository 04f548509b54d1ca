#!/usr/bin/env bash
# Full-length runs of the tutorials' recipes in both frameworks, one process per run, for RESULTS.md.
# Each run is `parity train MODEL --framework FW --seed S` with the model's own recipe (its epochs, batch, optimizer,
# early stopping). A finished run (its history.json has the final test accuracy) is skipped and an interrupted one is
# resumed from its last checkpoint, so the script can be stopped and started again. The one recipe TensorFlow cannot
# resume (tutorial 003's model.fit: EarlyStopping's state lives in memory) starts over; its partial run is kept
# beside it as seed<S>.interrupted-<time>.
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
      run="$out/$model/$fw/seed$seed"
      resume=()
      if [ -f "$run/history.json" ]; then
        # prints "finished", "resume" or "restart" (an unfinished run of a recipe this framework cannot resume)
        state=$(python3 -c 'import json, sys
h = json.load(open(sys.argv[1]))
print("finished" if "test_acc" in h else "restart" if sys.argv[2] == "tf" and h["recipe"]["loop"] == "fit" else "resume")
' "$run/history.json" "$fw")
        case $state in
          finished) echo "skip $model $fw seed $seed (finished)"; continue ;;
          restart) mv "$run" "$run.interrupted-$(date -u +%Y%m%dT%H%M%SZ)" ;;
          *) resume=(--resume) ;;
        esac
      fi
      echo "== $(date -u +%FT%TZ) $model $fw seed $seed ${resume[*]:-}"
      # shellcheck disable=SC2086  # PARITY_TRAIN_ARGS: extra `parity train` options, word-split on purpose
      "$parity" train "$model" --framework "$fw" --seed "$seed" --out "$out" --no-progress ${PARITY_TRAIN_ARGS:-} \
        "${resume[@]}"
    done
  done
done
