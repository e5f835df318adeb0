#include "op_checks.h"

#include <c10/util/irange.h>

namespace clasp {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_float_tensor(const at::Tensor& t, const char* op, const char* name, int64_t rank) {
  TORCH_CHECK(t.defined(), op, ": `", name, "` is undefined");
  TORCH_CHECK(t.dim() == rank, op, ": `", name, "` must have rank ", rank, ", got shape ",
              t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": `", name,
              "` must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.size(rank - 1) <= 1 || t.stride(rank - 1) == 1, op, ": `", name,
              "` must have a unit-stride last dimension (strides ", t.strides(),
              "); call .contiguous() first");
}

void check_int_tensor(const at::Tensor& t, const char* op, const char* name, int64_t rank,
                      at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), op, ": `", name, "` is undefined");
  TORCH_CHECK(t.dim() == rank, op, ": `", name, "` must have rank ", rank, ", got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": `", name, "` must be ", dtype, ", got ",
              t.scalar_type());
}

void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim, int64_t expected,
               const char* why) {
  TORCH_CHECK(t.size(dim) == expected, op, ": `", name, "`.size(", dim, ") must be ", expected,
              " (", why, "), got shape ", t.sizes());
}

void check_same_device(const char* op,
                       std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const auto& first = *ts.begin();
  for (const auto& [name, t] : ts) {
    TORCH_CHECK(t->device() == first.second->device(), op, ": all tensors must be on one device; `",
                first.first, "` is on ", first.second->device(), " but `", name, "` is on ",
                t->device());
  }
}

void check_num_draft_values_cpu(const char* op, const at::Tensor& num_draft, int64_t K) {
  const int32_t* nd = num_draft.const_data_ptr<int32_t>();
  const int64_t stride = num_draft.stride(0);
  for (int64_t b = 0; b < num_draft.size(0); ++b)
    TORCH_CHECK(nd[b * stride] >= 0 && nd[b * stride] <= K, op, ": num_draft[", b,
                "] = ", nd[b * stride], " is outside [0, K] with K = draft_tokens.size(1) = ", K);
}

void check_cosine_scores(const at::Tensor& candidates, const at::Tensor& target) {
  constexpr const char* op = "clasp::cosine_scores";
  check_float_tensor(candidates, op, "candidates", 3);
  check_float_tensor(target, op, "target", 2);
  check_same_device(op, {{"candidates", &candidates}, {"target", &target}});
  TORCH_CHECK(target.scalar_type() == candidates.scalar_type(), op,
              ": `target` must have the dtype of `candidates` (", candidates.scalar_type(),
              "), got ", target.scalar_type());
  check_dim(target, op, "target", 0, candidates.size(0), "batch size B of `candidates`");
  check_dim(target, op, "target", 1, candidates.size(2), "hidden size d of `candidates`");
  TORCH_CHECK(candidates.size(2) > 0, op, ": hidden size d must be positive, got shape ",
              candidates.sizes());
}

void check_layer_importance(const at::Tensor& hidden) {
  constexpr const char* op = "clasp::layer_importance";
  check_float_tensor(hidden, op, "hidden", 3);
  TORCH_CHECK(hidden.size(1) >= 1, op,
              ": `hidden` must hold L+1 >= 1 states [B, L+1, d], got shape ", hidden.sizes());
  TORCH_CHECK(hidden.size(2) > 0, op, ": hidden size d must be positive, got shape ",
              hidden.sizes());
}

void check_skip_search_step(const at::Tensor& prev, const at::Tensor& computed,
                            const at::Tensor& target, int64_t layer) {
  constexpr const char* op = "clasp::skip_search_step";
  check_float_tensor(prev, op, "prev", 3);
  check_float_tensor(computed, op, "computed", 3);
  check_float_tensor(target, op, "target", 2);
  check_same_device(op, {{"prev", &prev}, {"computed", &computed}, {"target", &target}});
  TORCH_CHECK(
      computed.scalar_type() == prev.scalar_type() && target.scalar_type() == prev.scalar_type(),
      op, ": `prev`, `computed` and `target` must share one dtype, got ", prev.scalar_type(), ", ",
      computed.scalar_type(), " and ", target.scalar_type());
  const int64_t B = prev.size(0), M = prev.size(1) - 1, d = prev.size(2);
  TORCH_CHECK(M >= 0, op, ": `prev` must hold M+1 >= 1 states [B, M+1, d], got shape ",
              prev.sizes());
  TORCH_CHECK(d > 0, op, ": hidden size d must be positive, got shape ", prev.sizes());
  TORCH_CHECK(layer >= 0, op, ": `layer` must be >= 0, got ", layer);
  check_dim(computed, op, "computed", 0, B, "batch size B of `prev`");
  check_dim(computed, op, "computed", 1, std::min(layer, M),
            "l = min(layer, M) keep candidates, M = prev.size(1) - 1");
  check_dim(computed, op, "computed", 2, d, "hidden size d of `prev`");
  check_dim(target, op, "target", 0, B, "batch size B of `prev`");
  check_dim(target, op, "target", 1, d, "hidden size d of `prev`");
}

void check_skip_search_backtrack(const at::Tensor& choices, int64_t num_skip) {
  constexpr const char* op = "clasp::skip_search_backtrack";
  check_int_tensor(choices, op, "choices", 3, at::kByte);
  const int64_t L = choices.size(1), M = choices.size(2) - 1;
  TORCH_CHECK(M >= 0, op, ": `choices` must be [B, L, M+1] with M+1 >= 1, got shape ",
              choices.sizes());
  TORCH_CHECK(num_skip >= 0 && num_skip <= M, op, ": `num_skip` must be in [0, M] with M = ", M,
              " (choices.size(2) - 1), got ", num_skip);
  TORCH_CHECK(num_skip <= L, op, ": `num_skip` must be <= L = ", L,
              " (number of layers, choices.size(1)), got ", num_skip);
}

namespace {
void check_draft_args(const char* op, const at::Tensor& draft_tokens, const at::Tensor& num_draft,
                      const at::Tensor& seq_lens) {
  check_int_tensor(draft_tokens, op, "draft_tokens", 2, at::kLong);
  check_int_tensor(num_draft, op, "num_draft", 1, at::kInt);
  check_int_tensor(seq_lens, op, "seq_lens", 1, at::kInt);
  const int64_t B = draft_tokens.size(0);
  check_dim(num_draft, op, "num_draft", 0, B, "batch size B of `draft_tokens`");
  check_dim(seq_lens, op, "seq_lens", 0, B, "batch size B of `draft_tokens`");
}
}  // namespace

void check_verify_greedy(const at::Tensor& draft_tokens, const at::Tensor& num_draft,
                         const at::Tensor& target_logits, const at::Tensor& seq_lens) {
  constexpr const char* op = "clasp::verify_greedy";
  check_draft_args(op, draft_tokens, num_draft, seq_lens);
  check_float_tensor(target_logits, op, "target_logits", 3);
  check_same_device(op, {{"target_logits", &target_logits},
                         {"draft_tokens", &draft_tokens},
                         {"num_draft", &num_draft},
                         {"seq_lens", &seq_lens}});
  const int64_t B = draft_tokens.size(0), K = draft_tokens.size(1);
  check_dim(target_logits, op, "target_logits", 0, B, "batch size B of `draft_tokens`");
  check_dim(target_logits, op, "target_logits", 1, K + 1,
            "K+1 positions, K = draft_tokens.size(1)");
  TORCH_CHECK(target_logits.size(2) > 0, op, ": vocabulary size V must be positive, got shape ",
              target_logits.sizes());
}

void check_verify_sample(const at::Tensor& draft_tokens, const at::Tensor& num_draft,
                         const at::Tensor& draft_probs, const at::Tensor& target_probs,
                         const at::Tensor& uniforms, const at::Tensor& seq_lens) {
  constexpr const char* op = "clasp::verify_sample";
  check_draft_args(op, draft_tokens, num_draft, seq_lens);
  check_float_tensor(draft_probs, op, "draft_probs", 3);
  check_float_tensor(target_probs, op, "target_probs", 3);
  check_int_tensor(uniforms, op, "uniforms", 3, at::kFloat);
  check_same_device(op, {{"target_probs", &target_probs},
                         {"draft_probs", &draft_probs},
                         {"uniforms", &uniforms},
                         {"draft_tokens", &draft_tokens},
                         {"num_draft", &num_draft},
                         {"seq_lens", &seq_lens}});
  TORCH_CHECK(draft_probs.scalar_type() == target_probs.scalar_type(), op,
              ": `draft_probs` must have the dtype of `target_probs` (", target_probs.scalar_type(),
              "), got ", draft_probs.scalar_type());
  const int64_t B = draft_tokens.size(0), K = draft_tokens.size(1), V = target_probs.size(2);
  TORCH_CHECK(V > 0, op, ": vocabulary size V must be positive, got shape ", target_probs.sizes());
  check_dim(target_probs, op, "target_probs", 0, B, "batch size B of `draft_tokens`");
  check_dim(target_probs, op, "target_probs", 1, K + 1, "K+1 positions, K = draft_tokens.size(1)");
  check_dim(draft_probs, op, "draft_probs", 0, B, "batch size B of `draft_tokens`");
  check_dim(draft_probs, op, "draft_probs", 1, K, "K = draft_tokens.size(1)");
  check_dim(draft_probs, op, "draft_probs", 2, V, "vocabulary size V of `target_probs`");
  check_dim(uniforms, op, "uniforms", 0, B, "batch size B of `draft_tokens`");
  check_dim(uniforms, op, "uniforms", 1, K + 1, "K+1 positions, K = draft_tokens.size(1)");
  check_dim(uniforms, op, "uniforms", 2, 2, "one acceptance and one resampling draw");
}

}  // namespace clasp
