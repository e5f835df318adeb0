// layer_importance on CPU: squared norms of all L+1 states once, then one dot per layer.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_reduce.h"

namespace clasp {

at::Tensor layer_importance_cpu(const at::Tensor& hidden) {
  check_layer_importance(hidden);
  const int64_t B = hidden.size(0), L = hidden.size(1) - 1, d = hidden.size(2);
  at::Tensor out = at::empty({B, L}, hidden.options().dtype(at::kFloat));
  if (B == 0 || L == 0) return out;
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, hidden.scalar_type(), "clasp::layer_importance", [&] {
        const scalar_t* h = hidden.const_data_ptr<scalar_t>();
        const int64_t hb = hidden.stride(0), hr = hidden.stride(1);
        const int64_t grain = std::max<int64_t>(1, 32768 / d);
        // norms[b * (L+1) + i] = |h_i|^2; the canonical order makes it the same value the dot
        // pass below would compute, so each state is normed once.
        std::vector<float> norms(B * (L + 1));
        at::parallel_for(0, B * (L + 1), grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t b = r / (L + 1), i = r % (L + 1);
            norms[r] = cpu::canonical_sum_sq(h + b * hb + i * hr, d);
          }
        });
        at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t b = r / L, i = r % L;
            float dot, a_sq;
            const scalar_t* hi = h + b * hb + i * hr;
            cpu::canonical_dot_and_sum_sq(hi, hi + hr, d, &dot, &a_sq);
            const float* nb = norms.data() + b * (L + 1);
            o[r] = 1.f - cosine_from_sums(dot, nb[i], nb[i + 1]);
          }
        });
      });
  return out;
}

}  // namespace clasp
