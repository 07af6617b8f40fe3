#!/usr/bin/env bash
# Wheels for the GPU machine, which has no network: what the suite's optional steps need beyond its own packages
# (today transformers for the `hf` step), for its Python (3.12, x86_64 Linux), into .wheels/ (git-ignored). Carry it
# with the device tool (carry: [".wheels"], under 64 MiB); gpu_suite.sh installs from it when a step needs it.
#   bash benchmarks/wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .wheels && mkdir -p .wheels
"$PY" -m pip download -q -d .wheels --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "transformers==5.25.0"
rm -f .wheels/numpy-* .wheels/kernels-*  # numpy is there already; kernels (hub kernels) is not used
du -sh .wheels
