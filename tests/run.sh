#!/usr/bin/env bash
# The test command: set up the environment and build (tests/env.sh), then run the formatting
# checks and pytest.
#
#   bash tests/run.sh                 # everything
#   bash tests/run.sh -k verify       # extra arguments go to pytest
set -euo pipefail
source "$(dirname "$0")/env.sh"

step "formatting checks (ruff, clang-format)"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'python/*.cpp' \
  | xargs "$venv/bin/clang-format" --dry-run -Werror

step "pytest"
"$py" -m pytest tests "$@"
