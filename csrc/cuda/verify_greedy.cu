// verify_greedy on CUDA, in one launch (plus a memset of the completion counters).
//
// A position's argmax over V up to 262144 is far too much traffic for one block, so the
// vocabulary of each position is cut into kChunk-wide chunks, one block each: grid = B x (K+1) x
// chunks, flattened. Every block leaves its chunk's (value, index) in a workspace and bumps its
// sequence's counter; the block that completes a sequence merges the chunks of every position,
// runs the shared prefix match and writes the outputs. The argmax order (clasp::argmax_better) is
// a total order, so the result does not depend on how the vocabulary is split and equals the CPU's.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_reduce.cuh"

namespace clasp {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / cuda::kWarp;
constexpr int64_t kGroupStep = int64_t{kThreads} * kVec;  // elements one block pass covers
// 16 elements per thread: enough blocks at decode sizes (17 x 64 at V = 262144) to fill the GPU,
// each thread still issuing its loads back to back.
constexpr int64_t kChunk = 2 * kGroupStep;

struct ArgMax {
  float value;
  int64_t index;
};

// Loses to every real entry, so lanes or chunks without entries can join any merge.
__device__ __forceinline__ ArgMax argmax_none() {
  return {-std::numeric_limits<float>::infinity(), std::numeric_limits<int64_t>::max()};
}

__device__ __forceinline__ ArgMax argmax_merge(ArgMax a, ArgMax b) {
  return argmax_better(b.value, b.index, a.value, a.index) ? b : a;
}

__device__ __forceinline__ ArgMax warp_argmax(ArgMax m) {
#pragma unroll
  for (int off = cuda::kWarp / 2; off > 0; off /= 2) {
    const long long index = __shfl_down_sync(0xffffffffu, static_cast<long long>(m.index), off);
    m = argmax_merge(m, ArgMax{__shfl_down_sync(0xffffffffu, m.value, off), index});
  }
  return m;
}

// Argmax of row[lo, hi) over the block; valid on thread 0.
template <typename T>
__device__ ArgMax block_argmax(const T* row, int64_t lo, int64_t hi) {
  __shared__ ArgMax warp_best[kWarps];
  const bool aligned = cuda::is_aligned16(row);  // lo is a multiple of kVec, so groups stay aligned
  ArgMax m = argmax_none();
#pragma unroll
  for (int r = 0; r < kChunk / kGroupStep; ++r) {
    const int64_t base = lo + r * kGroupStep + static_cast<int64_t>(threadIdx.x) * kVec;
    if (base >= hi) break;
    float x[kVec];
    const int n = cuda::load_group(row, base, hi, aligned && base + kVec <= hi, x);
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (k < n) m = argmax_merge(m, ArgMax{x[k], base + k});
  }
  m = warp_argmax(m);
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  if (lane == 0) warp_best[warp] = m;
  __syncthreads();
  if (warp == 0) m = warp_argmax(lane < kWarps ? warp_best[lane] : argmax_none());
  return m;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    verify_greedy_kernel(const T* __restrict__ logits, int64_t lb, int64_t lr, int64_t V,
                         const int64_t* draft, int64_t ds0, int64_t ds1, const int32_t* num_draft,
                         int64_t nds, int32_t* seq_lens, int64_t sls, int32_t* accepted,
                         int64_t* out_tokens, int64_t K, int64_t chunks, unsigned int* done,
                         float* part_value, long long* part_index, int64_t* argmax) {
  const int64_t blk = blockIdx.x;
  const int64_t c = blk % chunks, pos = blk / chunks % (K + 1), b = blk / chunks / (K + 1);
  // CUDA cannot raise on values: num_draft outside [0, K] is clamped (the CPU kernel raises).
  const int64_t nd = num_draft[b * nds];
  const int64_t n = nd < 0 ? 0 : (nd > K ? K : nd);
  if (pos > n) return;  // never compared: argmax positions 0..n are all the prefix match reads

  const int64_t lo = c * kChunk, hi = lo + kChunk < V ? lo + kChunk : V;
  const ArgMax m = block_argmax(logits + b * lb + pos * lr, lo, hi);

  __shared__ bool last;
  if (threadIdx.x == 0) {
    const int64_t slot = (b * (K + 1) + pos) * chunks + c;
    part_value[slot] = m.value;
    part_index[slot] = m.index;
    __threadfence();  // publish the partial before counting this block as done
    const unsigned int expected = static_cast<unsigned int>(chunks * (n + 1));
    last = atomicAdd(done + b, 1u) == expected - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();

  // Last block of sequence b: merge the chunks of each position (warp per position). __ldcg
  // reads at L2, where the other blocks' partials are, never a stale L1 line.
  const int warp = threadIdx.x / cuda::kWarp, lane = threadIdx.x % cuda::kWarp;
  for (int64_t p = warp; p <= n; p += kWarps) {
    const int64_t row = (b * (K + 1) + p) * chunks;
    ArgMax best = argmax_none();
    for (int64_t k = lane; k < chunks; k += cuda::kWarp)
      best = argmax_merge(best, ArgMax{__ldcg(part_value + row + k), __ldcg(part_index + row + k)});
    best = warp_argmax(best);
    if (lane == 0) argmax[b * (K + 1) + p] = best.index;
  }
  __syncthreads();

  __shared__ int32_t a_shared;
  const int64_t* dt = draft + b * ds0;
  const int64_t* am = argmax + b * (K + 1);
  if (threadIdx.x == 0) {
    // Draft tokens outside [0, V) never equal an argmax, so they are simply rejected.
    const int32_t a = accepted_prefix(
        static_cast<int32_t>(n), [&](int32_t i) { return dt[i * ds1]; },
        [&](int32_t i) { return am[i]; });
    accepted[b] = a;
    seq_lens[b * sls] += a + 1;
    a_shared = a;
  }
  __syncthreads();
  const int32_t a = a_shared;
  for (int64_t i = threadIdx.x; i <= K; i += kThreads)
    out_tokens[b * (K + 1) + i] = i < a ? dt[i * ds1] : (i == a ? am[a] : -1);
}

int64_t round_up16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& draft_tokens,
                                                      const at::Tensor& num_draft,
                                                      const at::Tensor& target_logits,
                                                      at::Tensor& seq_lens) {
  constexpr const char* op = "clasp::verify_greedy";
  check_verify_greedy(draft_tokens, num_draft, target_logits, seq_lens);
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const int64_t B = draft_tokens.size(0), K = draft_tokens.size(1), V = target_logits.size(2);
  at::Tensor accepted = at::empty({B}, num_draft.options());
  at::Tensor out_tokens = at::empty({B, K + 1}, draft_tokens.options());
  if (B == 0) return {accepted, out_tokens};

  const int64_t chunks = (V + kChunk - 1) / kChunk;
  const int64_t parts = B * (K + 1) * chunks;
  const unsigned int grid = cuda::grid_blocks(parts, op);
  // Workspace: completion counters, then per-chunk values and indices, then per-position argmax.
  const int64_t done_bytes = round_up16(B * int64_t{sizeof(unsigned int)});
  const int64_t value_bytes = round_up16(parts * int64_t{sizeof(float)});
  const int64_t index_bytes = parts * int64_t{sizeof(long long)};
  const int64_t argmax_bytes = B * (K + 1) * int64_t{sizeof(int64_t)};
  at::Tensor ws = at::empty({done_bytes + value_bytes + index_bytes + argmax_bytes},
                            target_logits.options().dtype(at::kByte));
  uint8_t* base = ws.data_ptr<uint8_t>();
  unsigned int* done = reinterpret_cast<unsigned int*>(base);
  float* part_value = reinterpret_cast<float*>(base + done_bytes);
  long long* part_index = reinterpret_cast<long long*>(base + done_bytes + value_bytes);
  int64_t* argmax = reinterpret_cast<int64_t*>(base + done_bytes + value_bytes + index_bytes);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(done, 0, B * sizeof(unsigned int), stream));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_logits.scalar_type(), op, [&] {
    verify_greedy_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        target_logits.const_data_ptr<scalar_t>(), target_logits.stride(0), target_logits.stride(1),
        V, draft_tokens.const_data_ptr<int64_t>(), draft_tokens.stride(0), draft_tokens.stride(1),
        num_draft.const_data_ptr<int32_t>(), num_draft.stride(0), seq_lens.data_ptr<int32_t>(),
        seq_lens.stride(0), accepted.data_ptr<int32_t>(), out_tokens.data_ptr<int64_t>(), K, chunks,
        done, part_value, part_index, argmax);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {accepted, out_tokens};
}

}  // namespace clasp
