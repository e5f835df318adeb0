// skip_search_backtrack on CUDA: one thread per sequence walks its choice table with the shared
// clasp::backtrack_skip_mask. The walk is a serial chain of L dependent reads, so there is nothing
// to split within a sequence; the table is tiny and the launch is what it costs.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../clasp_math.h"
#include "../op_checks.h"
#include "../ops.h"
#include "cuda_reduce.cuh"

namespace clasp {

namespace {

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads)
    skip_search_backtrack_kernel(const uint8_t* __restrict__ choices, int64_t s0, int64_t s1,
                                 int64_t s2, int64_t B, int64_t L, int64_t num_skip,
                                 bool* __restrict__ mask) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= B) return;
  const uint8_t* cb = choices + b * s0;
  bool* out = mask + b * L;
  backtrack_skip_mask(
      L, num_skip, [&](int64_t i, int64_t j) { return cb[i * s1 + j * s2]; },
      [&](int64_t i, bool skip) { out[i] = skip; });
}

}  // namespace

at::Tensor skip_search_backtrack_cuda(const at::Tensor& choices, int64_t num_skip) {
  constexpr const char* op = "clasp::skip_search_backtrack";
  check_skip_search_backtrack(choices, num_skip);
  const c10::cuda::CUDAGuard guard(choices.device());
  const int64_t B = choices.size(0), L = choices.size(1);
  at::Tensor mask = at::empty({B, L}, choices.options().dtype(at::kBool));
  if (B == 0 || L == 0) return mask;
  const unsigned int grid = cuda::grid_blocks((B + kThreads - 1) / kThreads, op);
  skip_search_backtrack_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      choices.const_data_ptr<uint8_t>(), choices.stride(0), choices.stride(1), choices.stride(2), B,
      L, num_skip, mask.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace clasp
