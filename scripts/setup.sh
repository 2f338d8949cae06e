#!/usr/bin/env bash
# Create the virtualenv and install the harness with its test extra.
# torch: an existing install (e.g. a CUDA build) is reused through --system-site-packages; with no
# torch anywhere, the CPU wheel torch==$TORCH_SPEC is installed first, so that the project's range
# (torch>=2.4) is already satisfied and pip does not pull a multi-GB CUDA build.
set -euo pipefail
VENV="${1:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PY="${PYTHON:-python3}"
if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: reusing the torch that $PY already has ($("$PY" -c 'import torch; print(torch.__version__)'))"
  "$PY" -m venv --system-site-packages "$VENV"
else
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: no torch found, installing $TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/harness" --version
