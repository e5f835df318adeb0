// CUDA realisation of the canonical reductions of clasp_math.h, shared by the CUDA kernels.
//
// One block of kLanes threads *is* the canonical dot product: lane t owns slots t*kVec ..
// t*kVec+kVec-1, so it accumulates element e = r*kSlots + t*kVec + k into its slot k for
// r = 0, 1, ... in increasing order; it then folds its slots left to right, and the lanes meet in
// the tree lane[t] += lane[t + off] for off = kLanes/2 .. 1 (shared memory down to one warp, then
// __shfl_down_sync, which pairs lanes the same way). Every product and sum is an explicit
// round-to-nearest step, so the results equal cpu_reduce.h bit for bit.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>

#include "../clasp_math.h"

namespace clasp::cuda {

constexpr int kWarp = 32;
static_assert((kLanes & (kLanes - 1)) == 0 && kLanes > kWarp,
              "the lane tree needs a power-of-two block of more than one warp");
static_assert(kSlots == kLanes * kVec, "a block step covers exactly kSlots elements");

template <typename T>
__device__ __forceinline__ float to_f32(T x) {
  return static_cast<float>(x);  // exact for fp16 / bf16, identity for fp32: same as the CPU
}

__host__ __device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// 16 bytes of T, so one load instruction moves a whole pack.
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kCount = 16 / sizeof(T);
  T v[kCount];
};

// The kVec elements at p (16-byte aligned) as floats, with 16-byte loads.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&x)[kVec]) {
  using Pack = Pack16<T>;
  static_assert(kVec % Pack::kCount == 0, "a group must be whole 16-byte packs");
  const Pack* src = reinterpret_cast<const Pack*>(p);
#pragma unroll
  for (int i = 0; i < kVec / Pack::kCount; ++i) {
    const Pack pk = src[i];
#pragma unroll
    for (int j = 0; j < Pack::kCount; ++j) x[i * Pack::kCount + j] = to_f32(pk.v[j]);
  }
}

// Loads the group of kVec elements starting at `base` of a row of length d and returns how many
// of them exist (the rest of x is left untouched and must not be used). The load width only
// changes how the values arrive, never which slot they are added to.
template <typename T>
__device__ __forceinline__ int load_group(const T* row, int64_t base, int64_t d, bool vec,
                                          float (&x)[kVec]) {
  if (vec) {
    load_vec(row + base, x);
    return kVec;
  }
  const int n = d - base < kVec ? static_cast<int>(d - base) : kVec;
#pragma unroll
  for (int k = 0; k < kVec; ++k)
    if (k < n) x[k] = to_f32(row[base + k]);
  return n;
}

__device__ __forceinline__ float fold_lane(const float (&slots)[kVec]) {
  float s = slots[0];
#pragma unroll
  for (int k = 1; k < kVec; ++k) s = add_rn(s, slots[k]);
  return s;
}

// Combines the kLanes lane values of each of N sums by the canonical tree. Must be called by all
// kLanes threads of the block; the results are valid on thread 0 only.
template <int N>
__device__ __forceinline__ void canonical_block_sum(float (&v)[N], float (*smem)[kLanes]) {
  const int t = threadIdx.x;
  __syncthreads();  // an earlier call may still be reading smem
#pragma unroll
  for (int i = 0; i < N; ++i) smem[i][t] = v[i];
  __syncthreads();
#pragma unroll
  for (int off = kLanes / 2; off > kWarp; off /= 2) {
    if (t < off) {
#pragma unroll
      for (int i = 0; i < N; ++i) smem[i][t] = add_rn(smem[i][t], smem[i][t + off]);
    }
    __syncthreads();
  }
  if (t < kWarp) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float s = add_rn(smem[i][t], smem[i][t + kWarp]);
#pragma unroll
      for (int off = kWarp / 2; off > 0; off /= 2)
        s = add_rn(s, __shfl_down_sync(0xffffffffu, s, off));
      v[i] = s;
    }
  }
}

// Canonical sums of N rows against one reference row, all read in a single pass:
//   out[2i] = dot(rows[i], ref), out[2i + 1] = |rows[i]|^2, out[2N] = |ref|^2.
// A cosine then is cosine_from_sums(out[2i], out[2i + 1], out[2N]), the same value as the CPU's
// canonical_cosine(rows[i], ref, d, canonical_sum_sq(ref, d)). Called by all kLanes threads of
// the block (blockDim.x == kLanes); results valid on thread 0 only.
template <int N, typename T>
__device__ __forceinline__ void canonical_cosine_sums(const T* const* rows, const T* ref, int64_t d,
                                                      float (&out)[2 * N + 1]) {
  constexpr int kSums = 2 * N + 1;
  __shared__ float smem[kSums][kLanes];
  // Vector loads need every row 16-byte aligned and no group straddling the row end.
  bool vec = d % kVec == 0 && is_aligned16(ref);
#pragma unroll
  for (int i = 0; i < N; ++i) vec = vec && is_aligned16(rows[i]);

  float acc[kSums][kVec];
#pragma unroll
  for (int s = 0; s < kSums; ++s)
#pragma unroll
    for (int k = 0; k < kVec; ++k) acc[s][k] = 0.f;

  for (int64_t base = static_cast<int64_t>(threadIdx.x) * kVec; base < d; base += kSlots) {
    float y[kVec];
    float x[N > 0 ? N : 1][kVec];
    const int n = load_group(ref, base, d, vec, y);
#pragma unroll
    for (int i = 0; i < N; ++i) load_group(rows[i], base, d, vec, x[i]);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k >= n) break;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        acc[2 * i][k] = add_rn(acc[2 * i][k], mul_rn(x[i][k], y[k]));
        acc[2 * i + 1][k] = add_rn(acc[2 * i + 1][k], mul_rn(x[i][k], x[i][k]));
      }
      acc[2 * N][k] = add_rn(acc[2 * N][k], mul_rn(y[k], y[k]));
    }
  }
#pragma unroll
  for (int s = 0; s < kSums; ++s) out[s] = fold_lane(acc[s]);
  canonical_block_sum(out, smem);
}

// Grid size for `blocks` blocks on a 1-D grid, or a clear error where CUDA cannot launch it.
inline unsigned int grid_blocks(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks > 0 && blocks <= INT_MAX, op, ": ", blocks,
              " blocks do not fit one CUDA grid (at most ", INT_MAX, ")");
  return static_cast<unsigned int>(blocks);
}

}  // namespace clasp::cuda
