#!/usr/bin/env bash
# README command 1: set up, fetch and verify the data, and run the main job: the side-by-side comparison of
# the TensorFlow reference and the Lightning port of tutorial 001's CNN on MNIST, on CPU, with its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/parity fetch --dataset all
.venv/bin/parity summary cnn --framework tf
.venv/bin/parity summary cnn --framework torch
# two epochs and a floor: the short form of level 4 that CI runs (one epoch is a draw too wide for a 98.5% floor)
.venv/bin/parity compare cnn --epochs 2 --min-acc 98.5 --out "${PARITY_REPORT_DIR:-reports/cnn}" "$@"
