// CPU realisation of the canonical reductions of clasp_math.h, shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>

#include "../clasp_math.h"

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time, so one
// binary is portable and still uses the wide vector units where they exist. -ffp-contract=off
// (setup.py) keeps the AVX-512/AVX2 clones from fusing multiply-adds: results stay bitwise equal.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CLASP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLASP_CPU_CLONES
#endif

namespace clasp::cpu {

template <typename T>
inline float to_f32(T x) {
  return static_cast<float>(x);
}

// Folds kSlots partial sums in the canonical order: lanes of kVec slots, then the lane tree.
inline float fold_slots(const float* slots) {
  float lanes[kLanes];
  for (int t = 0; t < kLanes; ++t) {
    float s = slots[t * kVec];
    for (int k = 1; k < kVec; ++k) s = add_rn(s, slots[t * kVec + k]);
    lanes[t] = s;
  }
  for (int off = kLanes / 2; off > 0; off /= 2)
    for (int t = 0; t < off; ++t) lanes[t] = add_rn(lanes[t], lanes[t + off]);
  return lanes[0];
}

// Canonical sum of a[e]^2 over e < d.
template <typename T>
CLASP_CPU_CLONES float canonical_sum_sq(const T* a, int64_t d) {
  alignas(64) float acc[kSlots] = {};
  for (int64_t base = 0; base < d; base += kSlots) {
    const int64_t n = std::min<int64_t>(kSlots, d - base);
    const T* pa = a + base;
    for (int64_t s = 0; s < n; ++s) {
      const float x = to_f32(pa[s]);
      acc[s] = add_rn(acc[s], mul_rn(x, x));
    }
  }
  return fold_slots(acc);
}

// Canonical dot(a, b) and sum of a^2 in one pass over a.
template <typename T>
CLASP_CPU_CLONES void canonical_dot_and_sum_sq(const T* a, const T* b, int64_t d, float* dot,
                                               float* a_sq) {
  alignas(64) float acc_ab[kSlots] = {};
  alignas(64) float acc_aa[kSlots] = {};
  for (int64_t base = 0; base < d; base += kSlots) {
    const int64_t n = std::min<int64_t>(kSlots, d - base);
    const T* pa = a + base;
    const T* pb = b + base;
    for (int64_t s = 0; s < n; ++s) {
      const float x = to_f32(pa[s]);
      const float y = to_f32(pb[s]);
      acc_ab[s] = add_rn(acc_ab[s], mul_rn(x, y));
      acc_aa[s] = add_rn(acc_aa[s], mul_rn(x, x));
    }
  }
  *dot = fold_slots(acc_ab);
  *a_sq = fold_slots(acc_aa);
}

// Cosine of a with b, given b's canonical squared norm.
template <typename T>
float canonical_cosine(const T* a, const T* b, int64_t d, float b_sq) {
  float dot, a_sq;
  canonical_dot_and_sum_sq(a, b, d, &dot, &a_sq);
  return cosine_from_sums(dot, a_sq, b_sq);
}

// Argmax of x[0..n) under clasp::argmax_better (NaN largest, lowest index on ties).
// Two passes: a vectorisable max (with a NaN flag), then the first index holding it.
struct ArgMax {
  float value;
  int64_t index;
};

template <typename T>
CLASP_CPU_CLONES ArgMax argmax_range(const T* x, int64_t begin, int64_t end) {
  // Pass 1: max and a NaN flag in kW independent lanes (vectorises; no early exit).
  constexpr int kW = 32;
  float lane_max[kW];
  int lane_nan[kW];
  for (int k = 0; k < kW; ++k) {
    lane_max[k] = -std::numeric_limits<float>::infinity();
    lane_nan[k] = 0;
  }
  int64_t i = begin;
  for (; i + kW <= end; i += kW) {
    for (int k = 0; k < kW; ++k) {
      const float v = to_f32(x[i + k]);
      lane_nan[k] |= (v != v);
      lane_max[k] = v > lane_max[k] ? v : lane_max[k];
    }
  }
  float m = -std::numeric_limits<float>::infinity();
  bool any_nan = false;
  for (int k = 0; k < kW; ++k) {
    m = lane_max[k] > m ? lane_max[k] : m;
    any_nan |= lane_nan[k] != 0;
  }
  for (; i < end; ++i) {
    const float v = to_f32(x[i]);
    any_nan |= (v != v);
    m = v > m ? v : m;
  }
  // Pass 2: the first index holding the winner (the first NaN if there is one), found a block at
  // a time so that the test of each block vectorises too.
  for (i = begin; i < end; i += kW) {
    const int64_t n = std::min<int64_t>(kW, end - i);
    int hit = 0;
    for (int64_t k = 0; k < n; ++k) {
      const float v = to_f32(x[i + k]);
      hit |= any_nan ? (v != v) : (v == m);
    }
    if (!hit) continue;
    for (int64_t k = 0; k < n; ++k) {
      const float v = to_f32(x[i + k]);
      if (any_nan ? (v != v) : (v == m)) return {v, i + k};
    }
  }
  return {m, begin};  // empty range
}

}  // namespace clasp::cpu
