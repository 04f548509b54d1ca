#!/usr/bin/env bash
# Set up the project's virtual environment in .venv (idempotent): the pinned, tested versions of
# torch, torchvision, lightning, TensorFlow and the test tools, and the project itself in editable mode.
#   PYTHON=python3.11 bash scripts/setup.sh      # choose the interpreter (Python >= 3.10)
#   PARITY_NO_TF=1 bash scripts/setup.sh         # the torch side only (no TensorFlow), e.g. on a GPU cluster
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${PARITY_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
extras="dev"
[ "${PARITY_NO_TF:-0}" = "1" ] || extras="tf,dev"
stamp="$VENV/.parity-installed"
want="$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)-$extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0  # already installed with these pins
fi
echo "installing the pinned dependencies into $VENV (a few minutes the first time)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$extras]"
echo "$want" > "$stamp"
