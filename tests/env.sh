#!/usr/bin/env bash
# Creates or reuses the project's virtual environment, installs what is needed and builds the
# extension in place (incrementally). Sourced by tests/run.sh and bench/generate.sh; afterwards
# $py is the environment's python.
#
# CLASP_VENV        virtual environment to use (default .venv in the repository root)
# CLASP_TORCH_SPEC  torch requirement installed when the venv has none (default torch==2.13.0)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv="${CLASP_VENV:-.venv}"
torch_spec="${CLASP_TORCH_SPEC:-torch==2.13.0}"
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

if [ ! -x "$venv/bin/python" ]; then
  step "creating virtual environment $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"

step "installing dependencies"
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "$torch_spec"
fi
"$py" -m pip install -q -r requirements-dev.txt
"$py" -c "import torch; print('torch', torch.__version__)"

step "building the extension (in place, incremental)"
# build_ext --inplace keeps its objects in build/, so a rerun recompiles only what changed (an
# editable pip install rebuilds everything in a temporary folder every time). pytest and
# `python -m` find the package in the repository root.
MAX_JOBS="${MAX_JOBS:-2}" "$py" setup.py -q build_ext --inplace
"$py" -m clasp_ext.info
