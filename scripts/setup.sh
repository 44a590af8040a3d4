#!/usr/bin/env bash
# Create .venv and install ultramem with everything its tests and exporters use.
# torch==2.13.0 first: on the CPU machines that pin takes a CPU wheel already on disk,
# where a bare `torch` would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
python3 -m venv .venv
.venv/bin/python -m pip install -qq --upgrade pip
.venv/bin/python -m pip install -qq torch==2.13.0
# PYTHONWARNINGS reaches the build backend's process: setuptools' note that an editable
# install maps the repository root onto the package is expected here, not news
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -qq -e ".[all]"
echo "setup: .venv ready with $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)') in $((SECONDS - start)) s"
