#!/usr/bin/env bash
# The parameter sweeps behind the library's defaults (issue 4): Qwen2.5-Coder-1.5B-Instruct bf16,
# one prompt per category group (seed 1, so the tuning prompts are not the headline run's sample),
# 64 new tokens, every setting interleaved per prompt in one process.
#   stage 1: one knob at a time around the first defaults (M = 7, max_draft 8, threshold 0.3,
#            interval 8, draft vocabulary 32768);
#   stage 2: around the best of stage 1 (draft_exit_threshold 0.6);
#   stage 3: more layers skipped under a high exit threshold, the best direction of stage 2.
#   bash bench/sweep_qwen.sh [1|2|3]      (default: all)
set -euo pipefail
source "$(dirname "$0")/../tests/env.sh"
"$py" -m pip install -q matplotlib
stages="${1:-1 2 3}"
common=(--model qwen2.5-coder-1.5b --dtype bfloat16 --per-category 1 --seed 1 --max-new-tokens 64)
if [[ " $stages " == *" 1 "* ]]; then
  step "sweep stage 1"
  "$py" bench/bench_e2e.py "${common[@]}" --out bench/results/sweep1-qwen2.5-coder-1.5b-bf16 \
    --methods ar "clasp:draft_exit_threshold=0.3" \
    clasp:draft_exit_threshold=0.3,num_skip_layers=6 \
    clasp:draft_exit_threshold=0.3,num_skip_layers=10 \
    clasp:draft_exit_threshold=0.3,num_skip_layers=14 \
    clasp:draft_exit_threshold=0.3,num_skip_layers=20 \
    clasp:draft_exit_threshold=0.3,max_draft=4 clasp:draft_exit_threshold=0.3,max_draft=12 \
    clasp:draft_exit_threshold=0.0 clasp:draft_exit_threshold=0.6 \
    clasp:draft_exit_threshold=0.3,update_interval=1 \
    clasp:draft_exit_threshold=0.3,update_interval=32 \
    clasp:draft_exit_threshold=0.3,draft_vocab_size=0 clasp-nodraft
fi
if [[ " $stages " == *" 2 "* ]]; then
  step "sweep stage 2"
  "$py" bench/bench_e2e.py "${common[@]}" --out bench/results/sweep2-qwen2.5-coder-1.5b-bf16 \
    --methods ar clasp:draft_exit_threshold=0.6 clasp:draft_exit_threshold=0.75 \
    clasp:draft_exit_threshold=0.9 \
    clasp:draft_exit_threshold=0.6,max_draft=5 clasp:draft_exit_threshold=0.75,max_draft=5 \
    clasp:draft_exit_threshold=0.6,num_skip_layers=5 \
    clasp:draft_exit_threshold=0.6,num_skip_layers=10 \
    clasp:draft_exit_threshold=0.6,update_interval=16
fi
if [[ " $stages " == *" 3 "* ]]; then
  step "sweep stage 3"
  "$py" bench/bench_e2e.py "${common[@]}" --out bench/results/sweep3-qwen2.5-coder-1.5b-bf16 \
    --methods ar clasp:draft_exit_threshold=0.6,num_skip_layers=10 \
    clasp:draft_exit_threshold=0.75,num_skip_layers=10 \
    clasp:draft_exit_threshold=0.6,num_skip_layers=12 \
    clasp:draft_exit_threshold=0.75,num_skip_layers=12 \
    clasp:draft_exit_threshold=0.75,num_skip_layers=14 \
    clasp:draft_exit_threshold=0.6,num_skip_layers=10,update_interval=16 \
    clasp:draft_exit_threshold=0.6,num_skip_layers=10,draft_vocab_size=0
fi
