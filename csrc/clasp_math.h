// Math shared bit for bit by the CPU and CUDA kernels.
//
// SPEC section 4 asks that discrete outputs (DP choices, accepted counts, tokens) of the CPU and
// CUDA kernels be identical on identical inputs. Floating-point sums depend on their order, so
// every reduction whose result feeds a decision follows one *canonical order* defined here, and
// both back ends implement exactly that order:
//
//   * Dot products / squared norms (cosine): element e is accumulated into slot e % kSlots in
//     increasing e; lane t folds its kVec slots t*kVec .. t*kVec+kVec-1 left to right; the kLanes
//     lanes are combined by the tree `lane[t] += lane[t + off]` for off = kLanes/2 .. 1.
//     A CUDA block of kLanes threads that loads kVec contiguous elements per thread per step and
//     then does a shared-memory / shuffle tree realises exactly this order; the CPU kernel keeps
//     kSlots accumulators, which vectorises well.
//   * Probability mass (speculative sampling): element e belongs to segment e / kSegLen; a
//     segment's mass is the left-to-right sum of its elements, the total mass the left-to-right
//     sum of segment masses. The inverse-CDF search walks those same partial sums.
//
// Products and sums use explicit round-to-nearest steps (no fused multiply-add), so compilers
// cannot contract them differently on the two sides; the final cosine combines in double, whose
// sqrt and division are correctly rounded on both.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CLASP_HD __host__ __device__ __forceinline__
#else
#define CLASP_HD inline
#endif

namespace clasp {

// ---- canonical reduction layout -------------------------------------------------------------
constexpr int kLanes = 256;            // threads of a reduction block
constexpr int kVec = 8;                // contiguous elements a lane owns per step
constexpr int kSlots = kLanes * kVec;  // accumulators of the canonical dot product
constexpr int kSegLen = 1024;          // segment length of the canonical probability scan

// Cosine denominators are clamped like torch.nn.functional.cosine_similarity (eps = 1e-8).
constexpr double kCosEps = 1e-8;

CLASP_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // host files are compiled with -ffp-contract=off
#endif
}

CLASP_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// cos = dot / sqrt(max(|a|^2 |b|^2, eps^2)), combined in double (correctly rounded everywhere).
CLASP_HD float cosine_from_sums(float dot, float norm_a_sq, float norm_b_sq) {
  double denom_sq = static_cast<double>(norm_a_sq) * static_cast<double>(norm_b_sq);
  if (denom_sq < kCosEps * kCosEps) denom_sq = kCosEps * kCosEps;
  return static_cast<float>(static_cast<double>(dot) / sqrt(denom_sq));
}

// ---- the DP choice rule (SPEC section 2) ------------------------------------------------------
// Skip wins ties; a NaN on either side also resolves to skip, so the rule is total.
CLASP_HD bool prefer_skip(float cos_keep, float cos_skip) { return !(cos_keep > cos_skip); }

// Which case row j of DP row i = layer + 1 is in, given M and l = min(layer, M) computed rows.
enum class DpCell : int { kVerify = 0, kCompare = 1, kForcedSkip = 2, kUnreachable = 3 };

CLASP_HD DpCell dp_cell(int64_t j, int64_t layer, int64_t num_skip) {
  const int64_t i = layer + 1;
  const int64_t l = layer < num_skip ? layer : num_skip;
  const int64_t reach = i < num_skip ? i : num_skip;
  if (j == 0) return DpCell::kVerify;
  if (j <= l) return DpCell::kCompare;
  if (j <= reach) return DpCell::kForcedSkip;
  return DpCell::kUnreachable;
}

// ---- argmax (greedy verification) -------------------------------------------------------------
// Total order used by every argmax: NaN is the largest value (like torch.argmax), and among equal
// values the lowest index wins. Returns true when (v, i) beats (best_v, best_i).
CLASP_HD bool argmax_better(float v, int64_t i, float best_v, int64_t best_i) {
  const bool v_nan = v != v;
  const bool b_nan = best_v != best_v;
  if (v_nan || b_nan) {
    if (v_nan && b_nan) return i < best_i;
    return v_nan;
  }
  if (v > best_v) return true;
  if (v < best_v) return false;
  return i < best_i;
}

// ---- prefix matching (greedy verification) ---------------------------------------------------
// a = length of the longest prefix with draft[i] == target_argmax[i]; then emit draft[0..a-1] and
// target_argmax[a]. Both back ends call this on the already reduced argmaxes.
template <typename ReadDraft, typename ReadArgmax>
CLASP_HD int32_t accepted_prefix(int32_t num_draft, ReadDraft draft, ReadArgmax argmax) {
  int32_t a = 0;
  while (a < num_draft && draft(a) == argmax(a)) ++a;
  return a;
}

// ---- speculative sampling (SPEC section 1) ---------------------------------------------------
// Accept draft token with probability min(1, p/q): u * q < p (u uniform in [0, 1)). A token the
// target gives zero mass is never accepted; one the draft gave zero mass is always accepted.
CLASP_HD bool accept_draft(float u, float p, float q) { return mul_rn(u, q) < p; }

// Residual mass max(0, p - q) of one vocabulary entry.
CLASP_HD float residual_mass(float p, float q) {
  const float r = p - q;
  return r > 0.f ? r : 0.f;
}

// ---- backtracking (SPEC section 2) -------------------------------------------------------------
// Walks the choice table from (L, num_skip) to layer 0: skip[i] = choice(i, j), and a skip moves
// to column j - 1. A choice is only honoured while j > 0, so a corrupt table cannot walk out of it.
template <typename ReadChoice, typename WriteSkip>
CLASP_HD void backtrack_skip_mask(int64_t num_layers, int64_t num_skip, ReadChoice choice,
                                  WriteSkip write) {
  int64_t j = num_skip;
  for (int64_t i = num_layers - 1; i >= 0; --i) {
    const bool skip = j > 0 && choice(i, j) != 0;
    write(i, skip);
    j -= skip ? 1 : 0;
  }
}

// ---- canonical inverse-CDF draw -------------------------------------------------------------
// Mass of one entry: negative and NaN entries count as zero.
CLASP_HD float clean_mass(float x) { return x > 0.f ? x : 0.f; }

// Draws index e with probability mass(e) / total, using threshold u * total (u in [0, 1)).
// seg_mass(k) must be the left-to-right sum of mass over segment k (elements k*kSegLen ..), and
// `total` the left-to-right sum of the segment masses. The walk is sequential so CPU and CUDA
// agree bit for bit; where rounding leaves no crossing (u close to 1), the last entry with
// positive mass in the crossing segment (or overall) is returned. Returns -1 when total <= 0.
template <typename Mass, typename SegMass>
CLASP_HD int64_t inverse_cdf_pick(int64_t V, float u, float total, Mass mass, SegMass seg_mass) {
  if (!(total > 0.f)) return -1;
  const float thr = mul_rn(u, total);
  const int64_t num_seg = (V + kSegLen - 1) / kSegLen;
  float cum = 0.f;
  int64_t last_seg = -1;
  bool crossed = false;
  for (int64_t k = 0; k < num_seg; ++k) {
    const float sm = seg_mass(k);
    if (sm > 0.f) last_seg = k;
    const float next = add_rn(cum, sm);
    if (next > thr) {
      last_seg = k;
      crossed = true;
      break;
    }
    cum = next;
  }
  if (last_seg < 0) return -1;
  const int64_t begin = last_seg * kSegLen;
  const int64_t end = begin + kSegLen < V ? begin + kSegLen : V;
  float c = cum;
  int64_t last_pos = -1;
  for (int64_t e = begin; e < end; ++e) {
    const float m = mass(e);
    if (m > 0.f) last_pos = e;
    c = add_rn(c, m);
    if (crossed && c > thr && m > 0.f) return e;
  }
  return last_pos;
}

}  // namespace clasp
