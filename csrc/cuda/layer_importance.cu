// layer_importance on CUDA: one canonical-reduction block per layer (b, i), reading h_i and
// h_{i+1} once for dot, |h_i|^2 and |h_{i+1}|^2. The canonical order makes those norms the values
// the CPU kernel computes once per state, so the scores agree bit for bit; each state is read by
// two neighbouring blocks, the second time mostly from L2.
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
    layer_importance_kernel(const T* __restrict__ hidden, int64_t hb, int64_t hr, int64_t L,
                            int64_t d, float* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int64_t b = r / L, i = r % L;
  const T* h_i = hidden + b * hb + i * hr;
  const T* rows[1] = {h_i};
  float s[3];
  cuda::canonical_cosine_sums<1>(rows, h_i + hr, d, s);
  if (threadIdx.x == 0) out[r] = 1.f - cosine_from_sums(s[0], s[1], s[2]);
}

}  // namespace

at::Tensor layer_importance_cuda(const at::Tensor& hidden) {
  constexpr const char* op = "clasp::layer_importance";
  check_layer_importance(hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t B = hidden.size(0), L = hidden.size(1) - 1, d = hidden.size(2);
  at::Tensor out = at::empty({B, L}, hidden.options().dtype(at::kFloat));
  if (B == 0 || L == 0) return out;
  const unsigned int grid = cuda::grid_blocks(B * L, op);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), op, [&] {
    layer_importance_kernel<scalar_t>
        <<<grid, kLanes, 0, stream>>>(hidden.const_data_ptr<scalar_t>(), hidden.stride(0),
                                      hidden.stride(1), L, d, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace clasp
