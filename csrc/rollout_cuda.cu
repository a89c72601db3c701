// Attention rollout CUDA kernels (compiled only with TRANSMIX_WITH_CUDA). The math is in rollout.h.
//
// Row path, one launch per layer, grid (row chunks, B), kRolloutRowsPerChunk rows per block:
//   phase 1: a warp per row computes s_i = sum_j fused A[i, j] and the row weight
//            w_i = v_i / ((1 - r) s_i + r) into shared memory;
//   phase 2: a thread per column j sums (1 - r) * w_i * fused A[i, j] over the block's rows in a
//            fixed order and writes the block's partial v (B, chunks, N).
// The next launch sums the partials of the rows it needs, so there are no atomics and the result
// is deterministic. The block's rows are read twice; the second read hits L1/L2 (rows x heads x N).
#include "rollout.h"

// c10/cuda only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a minimal
// toolkit (nvcc + cudart) lacks and these kernels do not use.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>

#include <string>

namespace transmix {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <int F>
__device__ __forceinline__ float combine(float acc, float x) {
  if constexpr (F == static_cast<int>(HeadFusion::kMean)) {
    return acc + x;
  } else if constexpr (F == static_cast<int>(HeadFusion::kMax)) {
    return (x > acc || isnan(x)) ? x : acc;  // NaN-propagating, like torch.amax
  } else {
    return (x < acc || isnan(x)) ? x : acc;
  }
}

// fusion over heads of A[b, :, i, j]; ptr points at A[b, 0, i, j].
template <typename scalar_t, int F>
__device__ __forceinline__ float fused_at(const scalar_t* __restrict__ ptr, int heads, int64_t head_stride,
                                          float inv_heads) {
  float x = static_cast<float>(ptr[0]);
  for (int h = 1; h < heads; ++h) x = combine<F>(x, static_cast<float>(ptr[h * head_stride]));
  return F == static_cast<int>(HeadFusion::kMean) ? x * inv_heads : x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the block; every thread gets the result. scratch: kWarps floats of shared memory.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.0f;
  for (int k = 0; k < kWarps; ++k) total += scratch[k];
  return total;
}

template <typename scalar_t, int F>
__global__ void __launch_bounds__(kThreads)
    rollout_row_step_kernel(const scalar_t* __restrict__ attn, const float* __restrict__ prev, int64_t prev_chunks,
                            float* __restrict__ cur, int64_t max_chunks, int heads, int64_t n, int64_t rows,
                            float residual) {
  const int64_t chunk = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t row0 = chunk * kRolloutRowsPerChunk;
  const int64_t block_rows = min(static_cast<int64_t>(kRolloutRowsPerChunk), rows - row0);
  const int64_t head_stride = n * n;
  const float inv_heads = 1.0f / static_cast<float>(heads);
  const float keep = 1.0f - residual;
  const scalar_t* attn_b = attn + b * heads * head_stride;
  __shared__ float weight[kRolloutRowsPerChunk];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t r = warp; r < block_rows; r += kWarps) {
    const int64_t i = row0 + r;
    const scalar_t* row = attn_b + i * n;
    float s = 0.0f;
    for (int64_t j = lane; j < n; j += 32) s += fused_at<scalar_t, F>(row + j, heads, head_stride, inv_heads);
    s = warp_sum(s);
    if (lane == 0) {
      // prev == nullptr: v = e_0, the first step of the chain.
      float v_i = prev == nullptr ? (i == 0 ? 1.0f : 0.0f) : 0.0f;
      for (int64_t pc = 0; pc < prev_chunks; ++pc) v_i += prev[(b * max_chunks + pc) * n + i];
      weight[r] = v_i / (keep * s + residual);
    }
  }
  __syncthreads();

  float* out = cur + (b * max_chunks + chunk) * n;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    float acc = 0.0f;
    for (int64_t r = 0; r < block_rows; ++r) {
      acc += weight[r] * fused_at<scalar_t, F>(attn_b + (row0 + r) * n + j, heads, head_stride, inv_heads);
    }
    acc *= keep;
    if (j >= row0 && j < row0 + block_rows) acc += residual * weight[j - row0];
    out[j] = acc;
  }
}

// out[b, :] = patch columns of sum over chunks of the last partials, renormalised to sum 1.
__global__ void __launch_bounds__(kThreads)
    rollout_row_finish_kernel(const float* __restrict__ partials, int64_t chunks, int64_t max_chunks, int64_t n,
                              int64_t num_prefix_tokens, float* __restrict__ out) {
  __shared__ float scratch[kWarps];
  const int64_t b = blockIdx.x;
  const int64_t patches = n - num_prefix_tokens;
  float* o = out + b * patches;
  float local = 0.0f;
  for (int64_t j = threadIdx.x; j < patches; j += kThreads) {
    float v = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) v += partials[(b * max_chunks + c) * n + num_prefix_tokens + j];
    o[j] = v;
    local += v;
  }
  const float inv_total = 1.0f / block_sum(local, scratch);
  for (int64_t j = threadIdx.x; j < patches; j += kThreads) o[j] *= inv_total;
}

// A'_l row by row: grid (N, B); out (B, N, N) fp32.
template <typename scalar_t, int F>
__global__ void __launch_bounds__(kThreads)
    rollout_layer_kernel(const scalar_t* __restrict__ attn, int heads, int64_t n, float residual,
                         float* __restrict__ out) {
  __shared__ float scratch[kWarps];
  const int64_t i = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t head_stride = n * n;
  const float inv_heads = 1.0f / static_cast<float>(heads);
  const scalar_t* row = attn + b * heads * head_stride + i * n;
  float* o = out + (b * n + i) * n;
  float local = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const float x = fused_at<scalar_t, F>(row + j, heads, head_stride, inv_heads);
    o[j] = x;
    local += x;
  }
  const float keep = 1.0f - residual;
  const float inv = 1.0f / (keep * block_sum(local, scratch) + residual);
  for (int64_t j = threadIdx.x; j < n; j += kThreads) o[j] = (keep * o[j] + (j == i ? residual : 0.0f)) * inv;
}

template <typename Fn>
void dispatch_fusion(HeadFusion fusion, Fn&& fn) {
  switch (fusion) {
    case HeadFusion::kMean: fn(std::integral_constant<int, 0>{}); break;
    case HeadFusion::kMax: fn(std::integral_constant<int, 1>{}); break;
    case HeadFusion::kMin: fn(std::integral_constant<int, 2>{}); break;
  }
}

}  // namespace

void attention_rollout_row_cuda(const std::vector<at::Tensor>& attentions, float residual, HeadFusion fusion,
                                int64_t num_prefix_tokens, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(attentions[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = attentions[0].size(0), n = attentions[0].size(2);
  const int heads = static_cast<int>(attentions[0].size(1));
  TORCH_CHECK_VALUE(batch <= 65535, "attention_rollout on CUDA supports B <= 65535, got ", std::to_string(batch));
  const int64_t max_chunks = (n + kRolloutRowsPerChunk - 1) / kRolloutRowsPerChunk;
  at::Tensor workspace = at::empty({2, batch, max_chunks, n}, attentions[0].options().dtype(at::kFloat));
  float* cur = workspace.data_ptr<float>();
  float* prev = cur + batch * max_chunks * n;
  int64_t prev_chunks = 0;

  TRANSMIX_DISPATCH_FLOAT_TYPES(attentions[0].scalar_type(), "rollout_row_cuda", [&] {
    dispatch_fusion(fusion, [&](auto f) {
      for (int64_t l = static_cast<int64_t>(attentions.size()) - 1; l >= 0; --l) {
        const bool first_step = prev_chunks == 0;
        const int64_t rows = first_step ? 1 : n;
        const int64_t chunks = (rows + kRolloutRowsPerChunk - 1) / kRolloutRowsPerChunk;
        const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(batch));
        rollout_row_step_kernel<scalar_t, decltype(f)::value><<<grid, kThreads, 0, stream>>>(
            attentions[l].data_ptr<scalar_t>(), first_step ? nullptr : prev, prev_chunks, cur, max_chunks, heads, n,
            rows, residual);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        std::swap(cur, prev);
        prev_chunks = chunks;
      }
    });
  });
  rollout_row_finish_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
      prev, prev_chunks, max_chunks, n, num_prefix_tokens, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rollout_layer_cuda(const at::Tensor& attention, float residual, HeadFusion fusion, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(attention.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = attention.size(0), n = attention.size(2);
  const int heads = static_cast<int>(attention.size(1));
  TORCH_CHECK_VALUE(batch <= 65535, "attention_rollout on CUDA supports B <= 65535, got ", std::to_string(batch));
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(batch));
  TRANSMIX_DISPATCH_FLOAT_TYPES(attention.scalar_type(), "rollout_layer_cuda", [&] {
    dispatch_fusion(fusion, [&](auto f) {
      rollout_layer_kernel<scalar_t, decltype(f)::value><<<grid, kThreads, 0, stream>>>(
          attention.data_ptr<scalar_t>(), heads, n, residual, out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::string cuda_build_version() {
  return std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
}

}  // namespace transmix
