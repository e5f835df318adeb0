#!/usr/bin/env bash
# The test command: create or reuse a virtual environment, install what is needed, build the
# extension against that environment's torch, then run the formatting checks and pytest.
#
#   bash tests/run.sh                 # everything
#   bash tests/run.sh -k verify       # extra arguments go to pytest
#
# CLASP_VENV      virtual environment to use (default .venv in the repository root)
# CLASP_TORCH_SPEC  torch requirement installed when the venv has none (default torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."

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

step "formatting checks (ruff, clang-format)"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'python/*.cpp' \
  | xargs "$venv/bin/clang-format" --dry-run -Werror

step "pytest"
"$py" -m pytest tests "$@"
