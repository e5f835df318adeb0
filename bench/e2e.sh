#!/usr/bin/env bash
# The end-to-end benchmark runs whose results are in bench/results/ and README (issue 4):
#
#   bash bench/e2e.sh [qwen-bf16|gemma-fp32|gemma-bf16|qwen-bf16-lookup ...]   (default: all)
#
# Each run: two prompts per category group of ../shared/data/spec_bench_dev.jsonl (seed 0),
# 96 new tokens, greedy, all methods interleaved per prompt in one process, threads pinned to the
# machine's cores. Qwen2.5-Coder-1.5B takes about 30 minutes on a 2-core CPU, Gemma 3 270M about 10.
set -euo pipefail
source "$(dirname "$0")/../tests/env.sh"
"$py" -m pip install -q matplotlib
methods=(ar clasp clasp-static clasp-importance clasp-random clasp-nodraft pld early-exit)
run() {
  local model="$1" dtype="$2" tag="$3"
  shift 3
  step "end-to-end: $model $dtype $tag"
  "$py" bench/bench_e2e.py --model "$model" --dtype "$dtype" --per-category 2 --seed 0 \
    --max-new-tokens 96 --methods "${@:-${methods[@]}}" --out "bench/results/e2e-$model-$tag"
}
for what in ${@:-qwen-bf16 gemma-fp32 gemma-bf16 qwen-bf16-lookup}; do
  case "$what" in
    qwen-bf16) run qwen2.5-coder-1.5b bfloat16 bf16 ;;
    gemma-fp32) run gemma-3-270m float32 fp32 ;;
    gemma-bf16) run gemma-3-270m bfloat16 bf16 ;;
    # the same prompts: context-lookup drafts first (lookup_ngram), against prompt lookup alone
    qwen-bf16-lookup) run qwen2.5-coder-1.5b bfloat16 bf16-lookup ar clasp clasp:lookup_ngram=3 pld ;;
    # issue 9: the round policies, with and without int8 draft copies, and layer skip alone
    qwen-bf16-policy) run qwen2.5-coder-1.5b bfloat16 bf16-policy ar pld \
      clasp-fixed:draft_weights=original clasp-cost:draft_weights=original \
      clasp-fixed:draft_weights=int8 clasp-cost:draft_weights=int8 \
      clasp-cost:draft_weights=int8,lookup_ngram=0 ;;
    # issue 9/10: the cost policy with and without its rounds' measured times (online_costs)
    qwen-bf16-online) run qwen2.5-coder-1.5b bfloat16 bf16-online ar pld clasp \
      clasp:online_costs=False ;;
    # fp32 is ~3x slower here: one prompt per group, 64 tokens (what bench/results reports)
    qwen-fp32-policy)
      step "end-to-end: qwen2.5-coder-1.5b float32 fp32-policy"
      "$py" bench/bench_e2e.py --model qwen2.5-coder-1.5b --dtype float32 --per-category 1 \
        --seed 0 --max-new-tokens 64 --methods ar pld clasp clasp-fixed:draft_weights=original \
        --out bench/results/e2e-qwen2.5-coder-1.5b-fp32-policy ;;
    # issue 10: throughput at batch 1, 2, 4, 8 against model.generate on the same padded batch,
    # requests arriving while others decode, and the batch skip-set rules (bench_batch.py; about
    # 20 minutes here)
    qwen-bf16-batch)
      step "batched: qwen2.5-coder-1.5b bfloat16"
      "$py" bench/bench_batch.py --model qwen2.5-coder-1.5b --dtype bfloat16 --prompts 8 \
        --batch-sizes 1 2 4 8 --max-new-tokens 64 --serving-requests 6 --serving-gap 3 \
        --skip-rules vote agreed \
        --out bench/results/batch-qwen2.5-coder-1.5b-bf16 ;;
    *) echo "bench/e2e.sh: unknown run '$what' (qwen-bf16, gemma-fp32, gemma-bf16, qwen-bf16-lookup, qwen-bf16-policy, qwen-bf16-online, qwen-fp32-policy, qwen-bf16-batch)" >&2; exit 2 ;;
  esac
done
