// verify_greedy on CPU: argmax of every needed verify position (vocabulary split into chunks that
// run in parallel), then the shared prefix match.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_reduce.h"

namespace clasp {

namespace {
constexpr int64_t kChunk = 32768;  // vocabulary entries per parallel argmax task
}  // namespace

std::tuple<at::Tensor, at::Tensor> verify_greedy_cpu(const at::Tensor& draft_tokens,
                                                     const at::Tensor& num_draft,
                                                     const at::Tensor& target_logits,
                                                     at::Tensor& seq_lens) {
  check_verify_greedy(draft_tokens, num_draft, target_logits, seq_lens);
  const int64_t B = draft_tokens.size(0), K = draft_tokens.size(1), V = target_logits.size(2);
  const int32_t* nd = num_draft.const_data_ptr<int32_t>();
  const int64_t nds = num_draft.stride(0);
  check_num_draft_values_cpu("clasp::verify_greedy", num_draft, K);

  at::Tensor accepted = at::empty({B}, num_draft.options());
  at::Tensor out_tokens = at::empty({B, K + 1}, draft_tokens.options());
  const int64_t chunks = (V + kChunk - 1) / kChunk;
  std::vector<cpu::ArgMax> partial(B * (K + 1) * chunks, cpu::ArgMax{0.f, -1});
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, target_logits.scalar_type(), "clasp::verify_greedy", [&] {
        const scalar_t* lg = target_logits.const_data_ptr<scalar_t>();
        const int64_t lb = target_logits.stride(0), lr = target_logits.stride(1);
        // Positions past num_draft[b] are never read: their argmax cannot matter.
        at::parallel_for(0, B * (K + 1) * chunks, std::max<int64_t>(1, 65536 / std::min(V, kChunk)),
                         [&](int64_t begin, int64_t end) {
                           for (int64_t t = begin; t < end; ++t) {
                             const int64_t c = t % chunks, pos = (t / chunks) % (K + 1),
                                           b = t / chunks / (K + 1);
                             if (pos > nd[b * nds]) continue;
                             const int64_t lo = c * kChunk, hi = std::min(V, lo + kChunk);
                             partial[t] = cpu::argmax_range(lg + b * lb + pos * lr, lo, hi);
                           }
                         });
      });

  const int64_t* dt = draft_tokens.const_data_ptr<int64_t>();
  const int64_t ds0 = draft_tokens.stride(0), ds1 = draft_tokens.stride(1);
  int32_t* acc = accepted.data_ptr<int32_t>();
  int64_t* ot = out_tokens.data_ptr<int64_t>();
  int32_t* sl = seq_lens.data_ptr<int32_t>();
  const int64_t sls = seq_lens.stride(0);
  for (int64_t b = 0; b < B; ++b) {
    auto argmax_at = [&](int64_t pos) {
      const cpu::ArgMax* p = partial.data() + (b * (K + 1) + pos) * chunks;
      cpu::ArgMax best = p[0];
      for (int64_t c = 1; c < chunks; ++c)
        if (argmax_better(p[c].value, p[c].index, best.value, best.index)) best = p[c];
      return best.index;
    };
    const int32_t a =
        accepted_prefix(nd[b * nds], [&](int32_t i) { return dt[b * ds0 + i * ds1]; }, argmax_at);
    for (int64_t i = 0; i < a; ++i) ot[b * (K + 1) + i] = dt[b * ds0 + i * ds1];
    ot[b * (K + 1) + a] = argmax_at(a);
    for (int64_t i = a + 1; i <= K; ++i) ot[b * (K + 1) + i] = -1;
    acc[b] = a;
    sl[b * sls] += a + 1;
  }
  return {accepted, out_tokens};
}

}  // namespace clasp
