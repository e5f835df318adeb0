// skip_search_step on CUDA: one block per DP cell (b, j). The block scores the cell's candidates
// with canonical reductions (so choices and scores equal the CPU's bit for bit), thread 0 applies
// the shared choice rule, and the whole block then copies the chosen state into `next`: scoring,
// selection and state update in one launch.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <type_traits>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_reduce.cuh"

namespace clasp {

namespace {

// Unsigned integer of T's width: states are copied as bits, like the CPU's memcpy.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 2, uint16_t,
                                std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;

// Copies a state row with the whole block, or zero-fills it when src is null (unreachable cell).
template <typename T>
__device__ void copy_row(T* dst, const T* src, int64_t d) {
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  if (bytes % 16 == 0 && cuda::is_aligned16(dst) && (src == nullptr || cuda::is_aligned16(src))) {
    uint4* dv = reinterpret_cast<uint4*>(dst);
    const uint4* sv = reinterpret_cast<const uint4*>(src);
    for (int64_t k = threadIdx.x; k < bytes / 16; k += blockDim.x)
      dv[k] = sv ? sv[k] : make_uint4(0u, 0u, 0u, 0u);
  } else {
    Bits<T>* db = reinterpret_cast<Bits<T>*>(dst);
    const Bits<T>* sb = reinterpret_cast<const Bits<T>*>(src);
    for (int64_t e = threadIdx.x; e < d; e += blockDim.x) db[e] = sb ? sb[e] : Bits<T>(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kLanes)
    skip_search_step_kernel(const T* __restrict__ prev, int64_t pb, int64_t pr,
                            const T* __restrict__ computed, int64_t cb, int64_t cr,
                            const T* __restrict__ target, int64_t tb, int64_t layer, int64_t M,
                            int64_t d, T* __restrict__ next, uint8_t* __restrict__ choice,
                            float* __restrict__ score) {
  __shared__ const T* chosen;  // thread 0's decision, for the block-wide copy
  const int64_t r = blockIdx.x;
  const int64_t b = r / (M + 1), j = r % (M + 1);
  const T* t = target + b * tb;
  const T* src = nullptr;
  uint8_t c = 0;
  float s = -std::numeric_limits<float>::infinity();
  // The case depends on j alone, so every branch is uniform across the block and may reduce.
  switch (dp_cell(j, layer, M)) {
    case DpCell::kVerify: {  // g(i, 0) = h_i; cos(t, t) from the one sum |t|^2 = dot(t, t)
      float sums[1];
      cuda::canonical_cosine_sums<0>(static_cast<const T* const*>(nullptr), t, d, sums);
      src = t;
      s = cosine_from_sums(sums[0], sums[0], sums[0]);
      break;
    }
    case DpCell::kCompare: {
      const T* rows[2] = {computed + b * cb + (j - 1) * cr, prev + b * pb + (j - 1) * pr};
      float sums[5];
      cuda::canonical_cosine_sums<2>(rows, t, d, sums);
      const float s_keep = cosine_from_sums(sums[0], sums[1], sums[4]);
      const float s_skip = cosine_from_sums(sums[2], sums[3], sums[4]);
      c = prefer_skip(s_keep, s_skip) ? 1 : 0;
      src = c ? rows[1] : rows[0];
      s = c ? s_skip : s_keep;
      break;
    }
    case DpCell::kForcedSkip: {  // g(i, i) = g(i-1, i-1)
      const T* rows[1] = {prev + b * pb + (j - 1) * pr};
      float sums[3];
      cuda::canonical_cosine_sums<1>(rows, t, d, sums);
      src = rows[0];
      c = 1;
      s = cosine_from_sums(sums[0], sums[1], sums[2]);
      break;
    }
    case DpCell::kUnreachable:
      break;
  }
  if (threadIdx.x == 0) {
    choice[r] = c;
    score[r] = s;
    chosen = src;
  }
  __syncthreads();
  copy_row(next + r * d, chosen, d);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> skip_search_step_cuda(const at::Tensor& prev,
                                                                     const at::Tensor& computed,
                                                                     const at::Tensor& target,
                                                                     int64_t layer) {
  constexpr const char* op = "clasp::skip_search_step";
  check_skip_search_step(prev, computed, target, layer);
  const c10::cuda::CUDAGuard guard(prev.device());
  const int64_t B = prev.size(0), M = prev.size(1) - 1, d = prev.size(2);
  at::Tensor next = at::empty({B, M + 1, d}, prev.options());
  at::Tensor choice = at::empty({B, M + 1}, prev.options().dtype(at::kByte));
  at::Tensor score = at::empty({B, M + 1}, prev.options().dtype(at::kFloat));
  if (B == 0) return {next, choice, score};
  const unsigned int grid = cuda::grid_blocks(B * (M + 1), op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prev.scalar_type(), op, [&] {
    // `computed` is empty at layer 0 (no keep candidates); its pointer is then never read.
    skip_search_step_kernel<scalar_t><<<grid, kLanes, 0, stream>>>(
        prev.const_data_ptr<scalar_t>(), prev.stride(0), prev.stride(1),
        computed.const_data_ptr<scalar_t>(), computed.stride(0), computed.stride(1),
        target.const_data_ptr<scalar_t>(), target.stride(0), layer, M, d, next.data_ptr<scalar_t>(),
        choice.data_ptr<uint8_t>(), score.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {next, choice, score};
}

}  // namespace clasp
