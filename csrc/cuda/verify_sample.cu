// verify_sample on CUDA: speculative sampling (SPEC section 1), one block per sequence.
//
// The draws follow clasp_math.h exactly as the CPU kernel does, so the same uniforms give the
// same tokens: thread 0 runs the acceptance chain; segment masses are left-to-right sums, thread t
// owning segments t, t + kThreads, ...; thread 0 sums them left to right into the total and runs
// clasp::inverse_cdf_pick. The residual draw falls back to a draw from p when it has no mass, and
// token 0 is emitted when p has none either.
//
// CUDA cannot raise on values, so where the CPU kernel raises this one is defined instead:
// num_draft[b] is clamped to [0, K], and a draft token outside [0, V) is read as p = q = 0, which
// clasp::accept_draft always rejects (the residual draw then proceeds from that position).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "../op_checks.h"
#include "../ops.h"
#include "cuda_reduce.cuh"

namespace clasp {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / cuda::kWarp;
constexpr int kTile = cuda::kWarp;  // segment entries staged per step: one coalesced warp load
constexpr int kWindow = 32;         // entries the single-thread walk fetches at once
static_assert(kSegLen % kTile == 0, "segments must be whole tiles");

template <typename T>
struct TargetMass {
  const T* p;
  __device__ float operator()(int64_t e) const { return clean_mass(cuda::to_f32(p[e])); }
};

template <typename T>
struct ResidualMass {
  const T* p;
  const T* q;
  __device__ float operator()(int64_t e) const {
    return residual_mass(cuda::to_f32(p[e]), cuda::to_f32(q[e]));
  }
};

struct SegmentMass {
  const float* seg;
  __device__ float operator()(int64_t k) const { return seg[k]; }
};

// inverse_cdf_pick reads entries in increasing order on one thread. One global load per entry
// would expose the full memory latency each time; refilling kWindow entries at once keeps that
// many independent loads in flight. The values are f's, so the walk is unchanged.
template <typename F>
struct Windowed {
  F f;
  int64_t size;
  int64_t lo = -kWindow;
  float buf[kWindow];
  __device__ float operator()(int64_t i) {
    if (i < lo || i >= lo + kWindow) {
      lo = i;
#pragma unroll
      for (int w = 0; w < kWindow; ++w) buf[w] = i + w < size ? f(i + w) : 0.f;
    }
    return buf[i - lo];
  }
};

// seg[k] = left-to-right sum of mass over segment k, thread t taking segments t, t + kThreads, ...
// A thread walking its own segment would make each warp load touch 32 cache lines, so the block
// stages kTile-wide columns of kThreads segments through shared memory with coalesced loads;
// each thread still adds its segment's entries one by one in increasing order.
template <typename Mass>
__device__ void segment_masses(int64_t V, int64_t num_seg, Mass mass, float* seg,
                               float (*tile)[kTile + 1]) {
  const int t = threadIdx.x, lane = t % cuda::kWarp, warp = t / cuda::kWarp;
  for (int64_t k0 = 0; k0 < num_seg; k0 += kThreads) {
    const int64_t k = k0 + t;
    float s = 0.f;
    for (int e0 = 0; e0 < kSegLen; e0 += kTile) {
      if (k0 * kSegLen + e0 >= V) break;  // uniform: no staged segment has entries left
#pragma unroll
      for (int i = 0; i < kThreads / kWarps; ++i) {
        const int r = warp + i * kWarps;
        const int64_t e = (k0 + r) * kSegLen + e0 + lane;
        tile[r][lane] = e < V ? mass(e) : 0.f;
      }
      __syncthreads();
      const int64_t row = k * kSegLen + e0;
#pragma unroll
      for (int col = 0; col < kTile; ++col)
        if (row + col < V) s = add_rn(s, tile[t][col]);
      __syncthreads();
    }
    if (k < num_seg) seg[k] = s;
  }
}

// The canonical draw from mass over [0, V) with uniform u; -1 when there is no mass. Called by the
// whole block (uniformly); the result is the same on every thread.
template <typename Mass>
__device__ int64_t draw(int64_t V, float u, Mass mass, float* seg, float (*tile)[kTile + 1],
                        int64_t* picked) {
  const int64_t num_seg = (V + kSegLen - 1) / kSegLen;
  segment_masses(V, num_seg, mass, seg, tile);
  __syncthreads();  // seg[] complete and visible to thread 0
  if (threadIdx.x == 0) {
    Windowed<SegmentMass> seg_mass{SegmentMass{seg}, num_seg};
    float total = 0.f;
    for (int64_t k = 0; k < num_seg; ++k) total = add_rn(total, seg_mass(k));
    *picked = inverse_cdf_pick(V, u, total, Windowed<Mass>{mass, V}, seg_mass);
  }
  __syncthreads();
  return *picked;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    verify_sample_kernel(const int64_t* draft, int64_t ds0, int64_t ds1, const int32_t* num_draft,
                         int64_t nds, const T* __restrict__ draft_probs, int64_t db, int64_t dr,
                         const T* __restrict__ target_probs, int64_t tb, int64_t tr,
                         const float* uniforms, int64_t us0, int64_t us1, int64_t us2,
                         int32_t* seq_lens, int64_t sls, int32_t* accepted, int64_t* out_tokens,
                         int64_t K, int64_t V, float* seg_ws) {
  __shared__ float tile[kThreads][kTile + 1];  // +1: row-wise reads hit distinct banks
  __shared__ int32_t a_shared;
  __shared__ int64_t picked;
  const int64_t b = blockIdx.x;
  const int64_t nd = num_draft[b * nds];
  const int32_t n = static_cast<int32_t>(nd < 0 ? 0 : (nd > K ? K : nd));
  const int64_t* dt = draft + b * ds0;
  const float* u = uniforms + b * us0;

  if (threadIdx.x == 0) {
    int32_t a = 0;
    while (a < n) {
      const int64_t tok = dt[a * ds1];
      const bool in_vocab = tok >= 0 && tok < V;
      const float p = in_vocab ? cuda::to_f32(target_probs[b * tb + a * tr + tok]) : 0.f;
      const float q = in_vocab ? cuda::to_f32(draft_probs[b * db + a * dr + tok]) : 0.f;
      if (!accept_draft(u[a * us1], p, q)) break;
      ++a;
    }
    a_shared = a;
  }
  __syncthreads();
  const int32_t a = a_shared;

  const T* p_row = target_probs + b * tb + a * tr;
  const float u_draw = u[a * us1 + us2];
  float* seg = seg_ws + b * ((V + kSegLen - 1) / kSegLen);
  int64_t tok = -1;
  if (a < n)  // rejected draft a+1: resample from normalize(max(0, p - q))
    tok =
        draw(V, u_draw, ResidualMass<T>{p_row, draft_probs + b * db + a * dr}, seg, tile, &picked);
  // All accepted: bonus token from p. Also the fallback when the residual has no mass.
  if (tok < 0) tok = draw(V, u_draw, TargetMass<T>{p_row}, seg, tile, &picked);
  if (tok < 0) tok = 0;  // p has no positive mass at all: degenerate input

  if (threadIdx.x == 0) {
    accepted[b] = a;
    seq_lens[b * sls] += a + 1;
  }
  for (int64_t i = threadIdx.x; i <= K; i += kThreads)
    out_tokens[b * (K + 1) + i] = i < a ? dt[i * ds1] : (i == a ? tok : -1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> verify_sample_cuda(
    const at::Tensor& draft_tokens, const at::Tensor& num_draft, const at::Tensor& draft_probs,
    const at::Tensor& target_probs, const at::Tensor& uniforms, at::Tensor& seq_lens) {
  constexpr const char* op = "clasp::verify_sample";
  check_verify_sample(draft_tokens, num_draft, draft_probs, target_probs, uniforms, seq_lens);
  const c10::cuda::CUDAGuard guard(target_probs.device());
  const int64_t B = draft_tokens.size(0), K = draft_tokens.size(1), V = target_probs.size(2);
  at::Tensor accepted = at::empty({B}, num_draft.options());
  at::Tensor out_tokens = at::empty({B, K + 1}, draft_tokens.options());
  if (B == 0) return {accepted, out_tokens};

  const unsigned int grid = cuda::grid_blocks(B, op);
  at::Tensor seg_ws = at::empty({B * ((V + kSegLen - 1) / kSegLen)}, uniforms.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_probs.scalar_type(), op, [&] {
    verify_sample_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        draft_tokens.const_data_ptr<int64_t>(), draft_tokens.stride(0), draft_tokens.stride(1),
        num_draft.const_data_ptr<int32_t>(), num_draft.stride(0),
        draft_probs.const_data_ptr<scalar_t>(), draft_probs.stride(0), draft_probs.stride(1),
        target_probs.const_data_ptr<scalar_t>(), target_probs.stride(0), target_probs.stride(1),
        uniforms.const_data_ptr<float>(), uniforms.stride(0), uniforms.stride(1),
        uniforms.stride(2), seq_lens.data_ptr<int32_t>(), seq_lens.stride(0),
        accepted.data_ptr<int32_t>(), out_tokens.data_ptr<int64_t>(), K, V,
        seg_ws.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {accepted, out_tokens};
}

}  // namespace clasp
