// verify_sample on CPU: speculative sampling (SPEC section 1) per sequence, in parallel over the
// batch. Acceptance tests and the residual / bonus draw follow clasp_math.h exactly, so the CUDA
// kernel emits the same tokens from the same uniforms.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../op_checks.h"
#include "../ops.h"
#include "cpu_reduce.h"

namespace clasp {

namespace {

// Canonical draw from mass(e) over [0, V): segment masses left to right, then the shared walk.
template <typename Mass>
int64_t draw(int64_t V, float u, Mass mass, std::vector<float>& seg) {
  const int64_t num_seg = (V + kSegLen - 1) / kSegLen;
  seg.assign(num_seg, 0.f);
  float total = 0.f;
  for (int64_t k = 0; k < num_seg; ++k) {
    float s = 0.f;
    const int64_t end = std::min(V, (k + 1) * kSegLen);
    for (int64_t e = k * kSegLen; e < end; ++e) s = add_rn(s, mass(e));
    seg[k] = s;
    total = add_rn(total, s);
  }
  return inverse_cdf_pick(V, u, total, mass, [&](int64_t k) { return seg[k]; });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> verify_sample_cpu(
    const at::Tensor& draft_tokens, const at::Tensor& num_draft, const at::Tensor& draft_probs,
    const at::Tensor& target_probs, const at::Tensor& uniforms, at::Tensor& seq_lens) {
  constexpr const char* op = "clasp::verify_sample";
  check_verify_sample(draft_tokens, num_draft, draft_probs, target_probs, uniforms, seq_lens);
  const int64_t B = draft_tokens.size(0), K = draft_tokens.size(1), V = target_probs.size(2);
  const int32_t* nd = num_draft.const_data_ptr<int32_t>();
  const int64_t* dt = draft_tokens.const_data_ptr<int64_t>();
  const int64_t nds = num_draft.stride(0), ds0 = draft_tokens.stride(0),
                ds1 = draft_tokens.stride(1);
  check_num_draft_values_cpu(op, num_draft, K);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < nd[b * nds]; ++i) {
      const int64_t tok = dt[b * ds0 + i * ds1];
      TORCH_CHECK(tok >= 0 && tok < V, op, ": draft_tokens[", b, ", ", i, "] = ", tok,
                  " is outside the vocabulary [0, ", V, ")");
    }
  }

  at::Tensor accepted = at::empty({B}, num_draft.options());
  at::Tensor out_tokens = at::empty({B, K + 1}, draft_tokens.options());
  int32_t* acc = accepted.data_ptr<int32_t>();
  int64_t* ot = out_tokens.data_ptr<int64_t>();
  int32_t* sl = seq_lens.data_ptr<int32_t>();
  const int64_t sls = seq_lens.stride(0);
  const float* un = uniforms.const_data_ptr<float>();
  const int64_t us0 = uniforms.stride(0), us1 = uniforms.stride(1), us2 = uniforms.stride(2);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, target_probs.scalar_type(), "clasp::verify_sample", [&] {
        const scalar_t* tp = target_probs.const_data_ptr<scalar_t>();
        const scalar_t* dp = draft_probs.const_data_ptr<scalar_t>();
        const int64_t tb = target_probs.stride(0), tr = target_probs.stride(1);
        const int64_t db = draft_probs.stride(0), dr = draft_probs.stride(1);
        const int64_t grain = std::max<int64_t>(1, 4096 / V);
        at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
          std::vector<float> seg;
          for (int64_t b = begin; b < end; ++b) {
            const float* u = un + b * us0;
            const int32_t n = nd[b * nds];
            int32_t a = 0;
            while (a < n) {
              const int64_t tok = dt[b * ds0 + a * ds1];
              const float p = cpu::to_f32(tp[b * tb + a * tr + tok]);
              const float q = cpu::to_f32(dp[b * db + a * dr + tok]);
              if (!accept_draft(u[a * us1], p, q)) break;
              ++a;
            }
            const scalar_t* p_row = tp + b * tb + a * tr;
            const float u_draw = u[a * us1 + us2];
            auto target_mass = [&](int64_t e) { return clean_mass(cpu::to_f32(p_row[e])); };
            int64_t tok = -1;
            if (a < n) {  // rejected draft a+1: resample from normalize(max(0, p - q))
              const scalar_t* q_row = dp + b * db + a * dr;
              tok = draw(
                  V, u_draw,
                  [&](int64_t e) {
                    return residual_mass(cpu::to_f32(p_row[e]), cpu::to_f32(q_row[e]));
                  },
                  seg);
            }
            // All accepted: bonus token from p. Also the fallback when the residual has no mass
            // (p == q up to rounding), where any draw from p is exact.
            if (tok < 0) tok = draw(V, u_draw, target_mass, seg);
            if (tok < 0) tok = 0;  // p has no positive mass at all: degenerate input
            for (int64_t i = 0; i < a; ++i) ot[b * (K + 1) + i] = dt[b * ds0 + i * ds1];
            ot[b * (K + 1) + a] = tok;
            for (int64_t i = a + 1; i <= K; ++i) ot[b * (K + 1) + i] = -1;
            acc[b] = a;
            sl[b * sls] += a + 1;
          }
        });
      });
  return {accepted, out_tokens};
}

}  // namespace clasp
