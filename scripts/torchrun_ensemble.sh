#!/usr/bin/env bash
# The same run under torchrun (one node, 4 GPUs; Lightning detects torchrun's environment and does not relaunch):
#
#   bash scripts/torchrun_ensemble.sh                 # DDP
#   MODE=members bash scripts/torchrun_ensemble.sh    # member-parallel
#
# Multi-node: run it on every node with NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0's address>.
# BATCH (default 100, the recipe's) is the global batch, split across NPROC x NNODES processes: a multiple of it.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-4}
NNODES=${NNODES:-1}
.venv/bin/parity fetch --dataset mnist
exec .venv/bin/torchrun --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m parity.cli train bn_cnn --framework torch --accelerator gpu --devices "$NPROC" --num-nodes "$NNODES" \
    --ensemble-mode "${MODE:-loop}" --batch-size "${BATCH:-100}" --out "${RUNS_DIR:-runs_cluster}" --no-progress
