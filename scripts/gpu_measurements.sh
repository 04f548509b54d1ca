#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md's GPU section, torch side only (TensorFlow is not needed), in stages that
# each fit in a few minutes, so that a machine with a CUDA device and a short lease measures them in a few calls.
#
#   bash scripts/gpu_measurements.sh OUT_DIR STAGE...
#
# Stages (each writes its files into OUT_DIR, at most two per stage; `all` runs them in this order):
#   env     device, driver and library versions; checks that the port imports without TensorFlow  -> env.txt
#   bench   parity bench: cnn and 5 x bn_cnn, eager / channels_last / bf16 / torch.compile / bare loop /
#           Trainer.fit / vectorized, with the "of matmul" share of the card's rate              -> bench.txt, bench.json
#   scale   parity bench --scale: ms per step against batch size and members                     -> scale.txt, scale.json
#   cnn     tutorial 001's `cnn` recipe, 15 epochs, float32 and bf16-mixed (goal: under 10 s of training)  -> cnn.txt
#   best    tutorial 001's best recipe, 5 x bn_cnn, augmentation drawn on the device, vectorized, bf16-mixed
#           (goals: >= 99.70% test accuracy, under 60 s of training)                              -> best.txt
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), DEVICE (cuda; cpu runs the same
# commands on the CPU), QUICK=1 (tiny budgets: a check that every stage runs, not a measurement), RUNS_DIR (training
# runs, checkpoints included; default $TMPDIR/gpu_measurements_runs, outside OUT_DIR), DATA_SOURCE (a folder of the
# MNIST IDX files, gz or not, copied into the cache first: for a machine without internet), TRAIN_LIMIT_S (each
# training run is stopped after this many seconds, default 540, so that a call within a 10-minute limit still
# reports the epochs it finished). The training stages print each run's training seconds (history.json's
# `train_seconds`: Trainer.fit's training epochs, without the final test) and test accuracy. A stage that fails
# does not stop the next ones; the script then exits 1 and names it.
#
# A machine without internet: put the four MNIST files (gz) into an ignored folder, e.g.
#   mkdir -p .device_data && gzip -c ~/.cache/tf-torch-parity/data/mnist/train-images-idx3-ubyte \
#       > .device_data/train-images-idx3-ubyte.gz     # and the other three
# carry it, and run there: DATA_SOURCE=.device_data bash scripts/gpu_measurements.sh "$OUT" env bench
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR STAGE... (stages: env bench scale cnn best, or all)" >&2
  exit 2
fi
out_arg=$1
shift
stages=("$@")
if [ "${stages[*]}" = "all" ]; then
  stages=(env bench scale cnn best)
fi
for stage in "${stages[@]}"; do
  case $stage in
    env|bench|scale|cnn|best) ;;
    *) echo "unknown stage '$stage': choose from env bench scale cnn best all" >&2; exit 2 ;;
  esac
done
# paths as the caller meant them, before the cd to the repository root
out=$(mkdir -p "$out_arg" && cd "$out_arg" && pwd)
runs=$(d=${RUNS_DIR:-${TMPDIR:-/tmp}/gpu_measurements_runs} && mkdir -p "$d" && cd "$d" && pwd)
if [ -n "${DATA_SOURCE:-}" ]; then
  DATA_SOURCE=$(cd "$DATA_SOURCE" && pwd)
fi
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
device=${DEVICE:-cuda}
accelerator=$([ "$device" = cuda ] && echo gpu || echo cpu)
export PYTHONUNBUFFERED=1
parity=("$PYTHON" -m parity.cli)

if [ "${QUICK:-0}" = 1 ]; then
  bench_budget=(--models cnn,bn_cnn:2 --steps 2 --repeats 1 --warmup 1)
  bench_variants=channels_last,bf16,fit,vectorized_bare
  scale_budget=(--models bn_cnn:1,bn_cnn:2 --batch-sizes 8,16 --steps 2 --repeats 1 --warmup 1)
  train_budget=(--epochs 1 --limit-train 200)
else
  bench_budget=(--steps 200 --repeats 5 --warmup 20)
  bench_variants=eager,channels_last,bf16,compiled,bare,fit,vectorized_bare,vectorized_fit
  scale_budget=(--steps 50 --repeats 3 --warmup 10)
  train_budget=()
fi

if [ -n "${DATA_SOURCE:-}" ]; then
  "${parity[@]}" fetch --dataset mnist --data-dir "$DATA_SOURCE" --offline
fi

# One line per run (RUNS_DIR/RUN/MODEL/torch/seed0/history.json): run, model, recipe, epochs, training seconds,
# test accuracy; a run stopped at TRAIN_LIMIT_S reports its finished epochs (seconds summed, the last epoch's test).
report() {
  "$PYTHON" - "$@" <<'EOF'
import json, sys
from pathlib import Path
for path in map(Path, sys.argv[1:]):
    if not path.is_file():
        print(f"{path.parents[3].name:22s} no history.json: the run finished no epoch")
        continue
    h = json.loads(path.read_text())
    epochs = h["epochs"]
    finished = "test_acc" in h
    seconds = h["train_seconds"] if finished else sum(e["seconds"] for e in epochs)
    acc = h["test_acc"] if finished else (epochs[-1].get("test_acc", float("nan")) if epochs else float("nan"))
    print(f"{path.parents[3].name:22s} {h['model']:7s} {h['recipe']['name']:12s} epochs {len(epochs):3d}  "
          f"train {seconds:8.1f} s  test acc {acc * 100:.2f}%" + ("" if finished else "  (stopped at the time limit)"))
EOF
}

train() {  # train NAME PRECISION [parity train options...]: one run into $runs/NAME
  local name=$1 precision=$2
  shift 2
  local status=0
  rm -rf "${runs:?}/$name"  # a fresh run: no history of an earlier one reported as this one's
  timeout "${TRAIN_LIMIT_S:-540}" "${parity[@]}" train "$@" --framework torch --accelerator "$accelerator" \
    --precision "$precision" --seed 0 --out "$runs/$name" --no-progress ${train_budget[@]+"${train_budget[@]}"} \
    || status=$?
  if [ "$status" = 124 ]; then
    echo "$name: stopped after ${TRAIN_LIMIT_S:-540} s (TRAIN_LIMIT_S)"
    return 0
  fi
  return "$status"
}

run_stage() {
  case $1 in
    env)
      {
        date -u +%FT%TZ
        if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
        "$PYTHON" - "$device" <<'EOF'
import platform, sys
import torch, lightning, torchmetrics
import torch_impl.train  # the port's whole training path
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"lightning {lightning.__version__}, torchmetrics {torchmetrics.__version__}")
if sys.argv[1] == "cuda":
    print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
print("TensorFlow imported:", "tensorflow" in sys.modules)
EOF
      } 2>&1 | tee "$out/env.txt"
      ;;
    bench)
      "${parity[@]}" bench --device "$device" --frameworks torch --variants "$bench_variants" "${bench_budget[@]}" \
        --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
      ;;
    scale)
      "${parity[@]}" bench --scale --device "$device" --frameworks torch "${scale_budget[@]}" \
        --json "$out/scale.json" 2>&1 | tee "$out/scale.txt"
      ;;
    cnn)
      train cnn_32-true 32-true cnn && train cnn_bf16-mixed bf16-mixed cnn &&
        report "$runs"/cnn_32-true/cnn/torch/seed0/history.json "$runs"/cnn_bf16-mixed/cnn/torch/seed0/history.json |
        tee "$out/cnn.txt"
      ;;
    best)
      train best_vectorized_bf16 bf16-mixed bn_cnn --recipe tut001_best --augment tut001_online \
        --ensemble-mode vectorized &&
        report "$runs"/best_vectorized_bf16/bn_cnn/torch/seed0/history.json | tee "$out/best.txt"
      ;;
  esac
}

failed=()
for stage in "${stages[@]}"; do
  echo "== $(date -u +%FT%TZ) stage $stage ($device)"
  # `if` (not `set -e`) decides: a failed stage is reported and the next one still runs
  if ! run_stage "$stage"; then
    echo "== stage $stage FAILED" >&2
    failed+=("$stage")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed stages: ${failed[*]}" >&2
  exit 1
fi
