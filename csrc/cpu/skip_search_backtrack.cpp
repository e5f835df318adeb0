// skip_search_backtrack on CPU: walk the stored choices from (L, num_skip) back to layer 0.
#include <ATen/Parallel.h>

#include "../clasp_math.h"
#include "../op_checks.h"
#include "../ops.h"

namespace clasp {

at::Tensor skip_search_backtrack_cpu(const at::Tensor& choices, int64_t num_skip) {
  check_skip_search_backtrack(choices, num_skip);
  const int64_t B = choices.size(0), L = choices.size(1);
  at::Tensor mask = at::empty({B, L}, choices.options().dtype(at::kBool));
  const uint8_t* ch = choices.const_data_ptr<uint8_t>();
  bool* out = mask.data_ptr<bool>();
  const int64_t s0 = choices.stride(0), s1 = choices.stride(1), s2 = choices.stride(2);
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* cb = ch + b * s0;
      backtrack_skip_mask(
          L, num_skip, [&](int64_t i, int64_t j) { return cb[i * s1 + j * s2]; },
          [&](int64_t i, bool skip) { out[b * L + i] = skip; });
    }
  });
  return mask;
}

}  // namespace clasp
