#!/usr/bin/env bash
# README command 2: set up and run the test suite (CPU only), twice:
# 1. everything, TensorFlow present: PARITY_REQUIRE_TF=1 turns a missing TensorFlow into a failure instead of
#    skipped tests;
# 2. the torch side's tests again in an environment without TensorFlow (as on a GPU machine with only PyTorch):
#    parity_tests/without_tensorflow/sitecustomize.py hides tensorflow / keras from this process and every process
#    it starts, so the tests that need TensorFlow skip and all the others must pass without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PARITY_REQUIRE_TF=1 .venv/bin/python -m pytest parity_tests -q -p no:cacheprovider "$@"
echo "== the torch side without TensorFlow"
export PYTHONPATH="$PWD/parity_tests/without_tensorflow${PYTHONPATH:+:$PYTHONPATH}"
if .venv/bin/python -c "import tensorflow" 2>/dev/null; then
  echo "TensorFlow is still importable: the torch-only pass would prove nothing" >&2
  exit 1
fi
PARITY_REQUIRE_TF=0 .venv/bin/python -m pytest parity_tests -q -p no:cacheprovider -m "not tf" "$@"
