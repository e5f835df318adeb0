// Kernel entry points of every op, one CPU and (when built) one CUDA function each.
// The schemas and their registration live in torch_bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace clasp {

#define CLASP_DECLARE_OPS(SUFFIX)                                                                 \
  at::Tensor cosine_scores_##SUFFIX(const at::Tensor& candidates, const at::Tensor& target);      \
  at::Tensor layer_importance_##SUFFIX(const at::Tensor& hidden);                                 \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> skip_search_step_##SUFFIX(                       \
      const at::Tensor& prev, const at::Tensor& computed, const at::Tensor& target,               \
      int64_t layer);                                                                             \
  at::Tensor skip_search_backtrack_##SUFFIX(const at::Tensor& choices, int64_t num_skip);         \
  std::tuple<at::Tensor, at::Tensor> verify_greedy_##SUFFIX(                                      \
      const at::Tensor& draft_tokens, const at::Tensor& num_draft,                                \
      const at::Tensor& target_logits, at::Tensor& seq_lens);                                     \
  std::tuple<at::Tensor, at::Tensor> verify_sample_##SUFFIX(                                      \
      const at::Tensor& draft_tokens, const at::Tensor& num_draft, const at::Tensor& draft_probs, \
      const at::Tensor& target_probs, const at::Tensor& uniforms, at::Tensor& seq_lens);

CLASP_DECLARE_OPS(cpu)
#ifdef CLASP_WITH_CUDA
CLASP_DECLARE_OPS(cuda)
#endif

#undef CLASP_DECLARE_OPS

}  // namespace clasp
