// cosine_scores on CUDA: one canonical-reduction block per candidate row (b, i). The block reads
// the candidate and its target once and forms dot, |c|^2 and |t|^2 together; |t|^2 is recomputed
// per block rather than shared, which costs arithmetic but no extra memory traffic or launch.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_reduce.cuh"

namespace clasp {

namespace {

template <typename T>
__global__ void __launch_bounds__(kLanes)
    cosine_scores_kernel(const T* __restrict__ candidates, int64_t cb, int64_t cr,
                         const T* __restrict__ target, int64_t tb, int64_t n, int64_t d,
                         float* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int64_t b = r / n, i = r % n;
  const T* rows[1] = {candidates + b * cb + i * cr};
  float s[3];
  cuda::canonical_cosine_sums<1>(rows, target + b * tb, d, s);
  if (threadIdx.x == 0) out[r] = cosine_from_sums(s[0], s[1], s[2]);
}

}  // namespace

at::Tensor cosine_scores_cuda(const at::Tensor& candidates, const at::Tensor& target) {
  constexpr const char* op = "clasp::cosine_scores";
  check_cosine_scores(candidates, target);
  const c10::cuda::CUDAGuard guard(candidates.device());
  const int64_t B = candidates.size(0), n = candidates.size(1), d = candidates.size(2);
  at::Tensor out = at::empty({B, n}, candidates.options().dtype(at::kFloat));
  if (B == 0 || n == 0) return out;
  const unsigned int grid = cuda::grid_blocks(B * n, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, candidates.scalar_type(), op, [&] {
    cosine_scores_kernel<scalar_t><<<grid, kLanes, 0, stream>>>(
        candidates.const_data_ptr<scalar_t>(), candidates.stride(0), candidates.stride(1),
        target.const_data_ptr<scalar_t>(), target.stride(0), n, d, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace clasp
