#!/usr/bin/env bash
# The decoding and model.generate tests on tiny models against older transformers releases: each
# release is installed, with the dependencies it pins (huggingface_hub, tokenizers, ...), into its
# own cached folder that is put in front of the project's environment on PYTHONPATH; torch and
# the built extension come from the environment (they do not depend on transformers). The newest
# release is the environment's own and is tested by tests/run.sh.
#
#   bash tests/transformers_matrix.sh                    # the releases in RELEASES below
#   bash tests/transformers_matrix.sh 5.17.0 -k greedy   # one release, extra pytest arguments
#
# CLASP_VENV   the environment (default .venv, set up by tests/env.sh)
# CLASP_CACHE  where the release folders live (default ~/.cache/clasp_ext)
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep in step with setup.py's install_requires: the oldest supported release, the first 5.x,
# the GPU test machine's image, and (via tests/run.sh) the newest.
RELEASES=(4.56.2 5.0.0 5.17.0)
venv="${CLASP_VENV:-.venv}"
py="$venv/bin/python"
cache="${CLASP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clasp_ext}"

releases=("${RELEASES[@]}")
if [[ $# -gt 0 && $1 =~ ^[0-9]+\.[0-9]+ ]]; then
  releases=("$1")
  shift
fi

for version in "${releases[@]}"; do
  target="$cache/transformers-$version"
  printf '\n=== transformers %s (%s)\n' "$version" "$(date +%H:%M:%S)"
  if ! PYTHONPATH="$target" "$py" -c "import transformers, sys; sys.exit(transformers.__version__ != '$version')" 2>/dev/null; then
    rm -rf "$target"
    "$py" -m pip install -q --target "$target" "transformers==$version"
  fi
  PYTHONPATH="$target" "$py" -c "import transformers; print('transformers', transformers.__version__, 'from', transformers.__file__)"
  PYTHONPATH="$target" "$py" -m pytest tests/test_decoding_*.py tests/test_hf_generate.py -q \
    -p no:cacheprovider "$@"
done
