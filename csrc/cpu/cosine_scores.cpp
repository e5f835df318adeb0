// cosine_scores on CPU: one canonical-order cosine per candidate row, rows in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_reduce.h"

namespace clasp {

at::Tensor cosine_scores_cpu(const at::Tensor& candidates, const at::Tensor& target) {
  check_cosine_scores(candidates, target);
  const int64_t B = candidates.size(0), n = candidates.size(1), d = candidates.size(2);
  at::Tensor out = at::empty({B, n}, candidates.options().dtype(at::kFloat));
  if (B == 0 || n == 0) return out;
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, candidates.scalar_type(), "clasp::cosine_scores", [&] {
        const scalar_t* c = candidates.const_data_ptr<scalar_t>();
        const scalar_t* t = target.const_data_ptr<scalar_t>();
        const int64_t cb = candidates.stride(0), cr = candidates.stride(1), tb = target.stride(0);
        std::vector<float> t_sq(B);
        for (int64_t b = 0; b < B; ++b) t_sq[b] = cpu::canonical_sum_sq(t + b * tb, d);
        const int64_t grain = std::max<int64_t>(1, 32768 / d);
        at::parallel_for(0, B * n, grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t b = r / n, i = r % n;
            o[r] = cpu::canonical_cosine(c + b * cb + i * cr, t + b * tb, d, t_sq[b]);
          }
        });
      });
  return out;
}

}  // namespace clasp
