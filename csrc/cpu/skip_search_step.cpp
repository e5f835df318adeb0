// skip_search_step on CPU: one DP row (SPEC section 2), every cell j of every batch in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <limits>
#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_reduce.h"

namespace clasp {

std::tuple<at::Tensor, at::Tensor, at::Tensor> skip_search_step_cpu(const at::Tensor& prev,
                                                                    const at::Tensor& computed,
                                                                    const at::Tensor& target,
                                                                    int64_t layer) {
  check_skip_search_step(prev, computed, target, layer);
  const int64_t B = prev.size(0), M = prev.size(1) - 1, d = prev.size(2);
  at::Tensor next = at::empty({B, M + 1, d}, prev.options());
  at::Tensor choice = at::empty({B, M + 1}, prev.options().dtype(at::kByte));
  at::Tensor score = at::empty({B, M + 1}, prev.options().dtype(at::kFloat));
  if (B == 0) return {next, choice, score};
  uint8_t* ch = choice.data_ptr<uint8_t>();
  float* sc = score.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, prev.scalar_type(), "clasp::skip_search_step", [&] {
        const scalar_t* pv = prev.const_data_ptr<scalar_t>();
        const scalar_t* cp = computed.const_data_ptr<scalar_t>();
        const scalar_t* tg = target.const_data_ptr<scalar_t>();
        scalar_t* nx = next.data_ptr<scalar_t>();
        const int64_t pb = prev.stride(0), pr = prev.stride(1);
        const int64_t cb = computed.stride(0), cr = computed.stride(1), tb = target.stride(0);
        std::vector<float> t_sq(B);
        for (int64_t b = 0; b < B; ++b) t_sq[b] = cpu::canonical_sum_sq(tg + b * tb, d);
        const int64_t grain = std::max<int64_t>(1, 16384 / d);
        at::parallel_for(0, B * (M + 1), grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t b = r / (M + 1), j = r % (M + 1);
            const scalar_t* t = tg + b * tb;
            scalar_t* dst = nx + r * d;
            const scalar_t* src = nullptr;
            uint8_t c = 0;
            float s = -std::numeric_limits<float>::infinity();
            switch (dp_cell(j, layer, M)) {
              case DpCell::kVerify:  // g(i, 0) = h_i
                src = t;
                s = cpu::canonical_cosine(t, t, d, t_sq[b]);
                break;
              case DpCell::kCompare: {
                const scalar_t* keep = cp + b * cb + (j - 1) * cr;
                const scalar_t* skip = pv + b * pb + (j - 1) * pr;
                const float s_keep = cpu::canonical_cosine(keep, t, d, t_sq[b]);
                const float s_skip = cpu::canonical_cosine(skip, t, d, t_sq[b]);
                c = prefer_skip(s_keep, s_skip) ? 1 : 0;
                src = c ? skip : keep;
                s = c ? s_skip : s_keep;
                break;
              }
              case DpCell::kForcedSkip:  // g(i, i) = g(i-1, i-1)
                src = pv + b * pb + (j - 1) * pr;
                c = 1;
                s = cpu::canonical_cosine(src, t, d, t_sq[b]);
                break;
              case DpCell::kUnreachable:
                break;
            }
            ch[r] = c;
            sc[r] = s;
            if (src)
              std::memcpy(dst, src, d * sizeof(scalar_t));
            else
              std::memset(dst, 0, d * sizeof(scalar_t));
          }
        });
      });
  return {next, choice, score};
}

}  // namespace clasp
