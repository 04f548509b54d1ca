#!/usr/bin/env bash
# README command 2: set up and run the whole test suite (CPU only). TensorFlow must be present here:
# PARITY_REQUIRE_TF=1 turns a missing TensorFlow into a failure instead of skipped tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PARITY_REQUIRE_TF=1
exec .venv/bin/python -m pytest parity_tests -q -p no:cacheprovider "$@"
