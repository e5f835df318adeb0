// The index of every op: schemas (namespace `clasp`) and the kernels registered for them.
// Shapes: B batch, n/l candidates, d hidden size, L layers, M skipped layers, K draft tokens,
// V vocabulary. See SPEC.md section 5 and the Python wrappers in clasp_ext/ops.py.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(clasp, m) {
  // cos(candidates[b, i], target[b]) for every candidate, fp32 [B, n].
  m.def("cosine_scores(Tensor candidates, Tensor target) -> Tensor");
  // 1 - cos(h_i, h_{i+1}) for every layer i of hidden [B, L+1, d], fp32 [B, L].
  m.def("layer_importance(Tensor hidden) -> Tensor");
  // One row of the skip-set DP: (next states [B, M+1, d], choice uint8 (1 = skip), score fp32).
  m.def(
      "skip_search_step(Tensor prev, Tensor computed, Tensor target, int layer) -> "
      "(Tensor, Tensor, Tensor)");
  // Backtrack a [B, L, M+1] choice table from (L, num_skip) into a bool [B, L] skip mask.
  m.def("skip_search_backtrack(Tensor choices, int num_skip) -> Tensor");
  // Greedy verification: (accepted int32 [B], emitted tokens int64 [B, K+1] padded with -1);
  // seq_lens += accepted + 1 in place.
  m.def(
      "verify_greedy(Tensor draft_tokens, Tensor num_draft, Tensor target_logits, "
      "Tensor(a!) seq_lens) -> (Tensor, Tensor)");
  // Speculative sampling with residual resampling, randomness only from `uniforms`.
  m.def(
      "verify_sample(Tensor draft_tokens, Tensor num_draft, Tensor draft_probs, "
      "Tensor target_probs, Tensor uniforms, Tensor(a!) seq_lens) -> (Tensor, Tensor)");
}

#define CLASP_REGISTER_IMPLS(m, SUFFIX)                                    \
  m.impl("cosine_scores", &clasp::cosine_scores_##SUFFIX);                 \
  m.impl("layer_importance", &clasp::layer_importance_##SUFFIX);           \
  m.impl("skip_search_step", &clasp::skip_search_step_##SUFFIX);           \
  m.impl("skip_search_backtrack", &clasp::skip_search_backtrack_##SUFFIX); \
  m.impl("verify_greedy", &clasp::verify_greedy_##SUFFIX);                 \
  m.impl("verify_sample", &clasp::verify_sample_##SUFFIX);

TORCH_LIBRARY_IMPL(clasp, CPU, m){CLASP_REGISTER_IMPLS(m, cpu)}
#ifdef CLASP_WITH_CUDA
TORCH_LIBRARY_IMPL(clasp, CUDA, m) {
  CLASP_REGISTER_IMPLS(m, cuda)
}
#endif
