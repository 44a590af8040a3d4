#!/usr/bin/env bash
# What `pip install ultramem` gives a user: build the wheel as pip does (isolated build),
# install it into a fresh venv outside the checkout, and export and check the bundled
# model from a folder that holds no source. Usage: bash scripts/wheel_smoke.sh [WORKDIR]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
start=$SECONDS
# a copy of the source: setuptools builds in the tree it is given (build/)
mkdir -p "$work/src"
tar -C "$repo" --exclude=.git --exclude=.venv --exclude=build --exclude=dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=artifacts -cf - . | tar -C "$work/src" -xf -
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -qq --upgrade pip
"$work/venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$work/src"
# torch first, pinned: the CPU wheel on these machines (a bare `torch` is a CUDA build)
"$work/venv/bin/python" -m pip install -qq torch==2.13.0
"$work/venv/bin/python" -m pip install -qq "$work"/dist/ultramem-*.whl
cd "$work"  # no checkout on the path: the package must come from the wheel
where=$("$work/venv/bin/python" -c 'import ultramem; print(ultramem.__file__)')
case "$where" in "$work/venv/"*) ;; *) echo "ultramem imported from $where, not the wheel" >&2; exit 1 ;; esac
"$work/venv/bin/ultramem" --help > /dev/null
"$work/venv/bin/ultramem" export --out "$work/artifacts"
"$work/venv/bin/ultramem" check --artifacts "$work/artifacts"
echo "wheel smoke: $(basename "$work"/dist/ultramem-*.whl) installed outside the checkout, export and check passed in $((SECONDS - start)) s"
