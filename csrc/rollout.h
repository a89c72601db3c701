// Attention rollout (Abnar & Zuidema 2020) for transmix_kernels._C.
//
// Per layer l (first block first): A_l = fusion over heads of the attention probabilities,
// A'_l = ((1 - r) * A_l + r * I) with each row renormalised to sum 1, rollout = A'_L @ ... @ A'_1.
// The class-token row e_0 @ rollout is a chain of vector-times-matrix products
//     v <- e_0;  for l = L .. 1:  v <- v @ A'_l
// and with s_i = sum_j A_l[i, j] the row scale is d_i = (1 - r) * s_i + r, so
//     (v @ A'_l)[j] = (1 - r) * sum_i (v_i / d_i) * A_l[i, j] + r * v_j / d_j.
// Head fusion, residual and renormalisation happen while each matrix is read: no (B, N, N)
// intermediate exists on the row path.
#pragma once

// ATen only (no torch/extension.h): the .cu includes this header, and nvcc need not parse pybind11.
#include <ATen/ATen.h>

#include <string>
#include <vector>

// The input dtypes the ops accept (all accumulate in fp32); no double instantiations.
#define TRANSMIX_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)             \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace transmix {

enum class HeadFusion : int { kMean = 0, kMax = 1, kMin = 2 };

// Row-chunk height of the row path. Fixed (not derived from the thread count) so that the
// summation order, hence the result, does not depend on how many threads run it.
constexpr int64_t kRolloutRowsPerChunk = 32;

HeadFusion parse_head_fusion(const std::string& name);

// attentions: L tensors (B, heads, N, N), first block first -> (B, N - num_prefix_tokens) float32.
at::Tensor attention_rollout_row(const std::vector<at::Tensor>& attentions, double residual,
                                 const std::string& head_fusion, int64_t num_prefix_tokens);

// attentions: L tensors (B, heads, N, N) -> (B, N, N) float32 product A'_L @ ... @ A'_1.
at::Tensor attention_rollout_full(const std::vector<at::Tensor>& attentions, double residual,
                                  const std::string& head_fusion);

// One layer's A'_l: (B, heads, N, N) -> (B, N, N) float32 (exposed for tests of the full path).
at::Tensor rollout_layer(const at::Tensor& attention, double residual, const std::string& head_fusion);

#ifdef TRANSMIX_WITH_CUDA
// Launchers in rollout_cuda.cu; inputs already checked.
void attention_rollout_row_cuda(const std::vector<at::Tensor>& attentions, float residual,
                                HeadFusion fusion, int64_t num_prefix_tokens, at::Tensor& out);
void rollout_layer_cuda(const at::Tensor& attention, float residual, HeadFusion fusion, at::Tensor& out);
std::string cuda_build_version();
#endif

}  // namespace transmix
