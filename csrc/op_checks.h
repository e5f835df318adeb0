// Input validation shared by the CPU and CUDA kernels of every op. Each check names the argument,
// what was expected and what was received, so a caller can fix the call from the message alone.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

namespace clasp {

// Floating dtypes every kernel accepts; accumulation is fp32 whatever the input.
bool is_supported_float(at::ScalarType t);

// `t` has rank `rank`, a supported float dtype and a unit-stride last dimension (other dims may
// be strided). `op` and `name` go into the message.
void check_float_tensor(const at::Tensor& t, const char* op, const char* name, int64_t rank);

// `t` has rank `rank` and exactly dtype `dtype`.
void check_int_tensor(const at::Tensor& t, const char* op, const char* name, int64_t rank,
                      at::ScalarType dtype);

// t.size(dim) == expected, or a message naming both tensors' roles.
void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim, int64_t expected,
               const char* why);

// All tensors on the device of the first one.
void check_same_device(const char* op,
                       std::initializer_list<std::pair<const char*, const at::Tensor*>> ts);

// Values of num_draft (a CPU tensor) lie in [0, K]. Only the CPU kernels call it: on CUDA it would
// need a host sync, so the CUDA kernels clamp instead.
void check_num_draft_values_cpu(const char* op, const at::Tensor& num_draft, int64_t K);

// Per-op argument checks (one per op, used by both back ends).
void check_cosine_scores(const at::Tensor& candidates, const at::Tensor& target);
void check_layer_importance(const at::Tensor& hidden);
void check_skip_search_step(const at::Tensor& prev, const at::Tensor& computed,
                            const at::Tensor& target, int64_t layer);
void check_skip_search_backtrack(const at::Tensor& choices, int64_t num_skip);
void check_verify_greedy(const at::Tensor& draft_tokens, const at::Tensor& num_draft,
                         const at::Tensor& target_logits, const at::Tensor& seq_lens);
void check_verify_sample(const at::Tensor& draft_tokens, const at::Tensor& num_draft,
                         const at::Tensor& draft_probs, const at::Tensor& target_probs,
                         const at::Tensor& uniforms, const at::Tensor& seq_lens);

}  // namespace clasp
