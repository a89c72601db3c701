// Attention rollout: input checks, the CPU implementation (at::parallel_for) and dispatch.
// The math is derived in rollout.h.
#include "rollout.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace transmix {

HeadFusion parse_head_fusion(const std::string& name) {
  if (name == "mean") return HeadFusion::kMean;
  if (name == "max") return HeadFusion::kMax;
  if (name == "min") return HeadFusion::kMin;
  TORCH_CHECK_VALUE(false, "head_fusion must be one of ('mean', 'max', 'min'), got '", name, "'");
  return HeadFusion::kMean;  // unreachable: the check throws
}

namespace {

// Everything is checked before any allocation or launch, so a failing call has no effect.
void check_attentions(const std::vector<at::Tensor>& attentions, double residual) {
  TORCH_CHECK_VALUE(!attentions.empty(), "attentions must be a non-empty list of (B, heads, N, N) tensors");
  const at::Tensor& first = attentions[0];
  for (size_t k = 0; k < attentions.size(); ++k) {
    const at::Tensor& a = attentions[k];
    TORCH_CHECK_TYPE(a.defined(), "attentions[", k, "] is an undefined tensor");
    TORCH_CHECK_VALUE(a.dim() == 4 && a.size(2) == a.size(3) && a.size(1) > 0 && a.size(2) > 0,
                      "attentions[", k, "] must have shape (B, heads, N, N) with heads, N >= 1, got ", a.sizes());
    TORCH_CHECK_VALUE(a.sizes() == first.sizes(), "attentions[", k, "] has shape ", a.sizes(),
                      " but attentions[0] has shape ", first.sizes(), "; all layers must match");
    const auto dtype = a.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                     "attentions[", k, "] must have dtype float32, bfloat16 or float16, got ", dtype);
    TORCH_CHECK_TYPE(dtype == first.scalar_type(), "attentions[", k, "] has dtype ", dtype,
                     " but attentions[0] has dtype ", first.scalar_type(), "; all layers must match");
    TORCH_CHECK_VALUE(a.device() == first.device(), "attentions[", k, "] is on ", a.device(),
                      " but attentions[0] is on ", first.device(), "; all layers must be on one device");
    TORCH_CHECK_VALUE(a.is_contiguous(), "attentions[", k, "] must be contiguous (call .contiguous())");
  }
  const auto device = first.device();
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), "attentions must be CPU or CUDA tensors, got ", device);
#ifndef TRANSMIX_WITH_CUDA
  TORCH_CHECK_VALUE(device.is_cpu(), "attentions are CUDA tensors but transmix_kernels._C was built without CUDA "
                    "(rebuild with a CUDA toolkit, or TRANSMIX_FORCE_CUDA=1)");
#endif
  TORCH_CHECK_VALUE(std::isfinite(residual) && residual >= 0.0 && residual <= 1.0,
                    "residual must be in [0, 1], got ", residual);
}

// NaN-propagating like torch.amax / torch.amin, so every path agrees on bad inputs.
template <HeadFusion F>
inline float combine(float acc, float x) {
  if constexpr (F == HeadFusion::kMean) {
    return acc + x;
  } else if constexpr (F == HeadFusion::kMax) {
    return (x > acc || std::isnan(x)) ? x : acc;
  } else {
    return (x < acc || std::isnan(x)) ? x : acc;
  }
}

// Eight independent partial sums: vectorisable without -ffast-math, and a fixed order.
inline float row_sum(const float* x, int64_t n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int k = 0; k < 8; ++k) part[k] += x[j + k];
  }
  for (; j < n; ++j) part[j & 7] += x[j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// buf[j] = fusion over heads of A[b, h, i, j] in fp32; returns sum_j buf[j].
// row points at A[b, 0, i, 0]; head h starts head_stride elements further.
template <typename scalar_t, HeadFusion F>
inline float fuse_row(const scalar_t* row, int64_t heads, int64_t head_stride, int64_t n, float* buf) {
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(row[j]);
  for (int64_t h = 1; h < heads; ++h) {
    const scalar_t* r = row + h * head_stride;
    for (int64_t j = 0; j < n; ++j) buf[j] = combine<F>(buf[j], static_cast<float>(r[j]));
  }
  if constexpr (F == HeadFusion::kMean) {
    const float inv_heads = 1.0f / static_cast<float>(heads);
    for (int64_t j = 0; j < n; ++j) buf[j] *= inv_heads;
  }
  return row_sum(buf, n);
}

// The class-token row: v <- v @ A'_l for l = L .. 1. Each step is parallel over
// (batch, chunk of rows); a chunk writes its own partial v (B, C, N), and the next step sums
// the C partials of the rows it needs, so no two threads write one value and the order is fixed.
template <typename scalar_t, HeadFusion F>
void rollout_row_cpu(const std::vector<at::Tensor>& attentions, float residual, int64_t num_prefix_tokens,
                     at::Tensor& out) {
  const int64_t batch = attentions[0].size(0), heads = attentions[0].size(1), n = attentions[0].size(2);
  const int64_t head_stride = n * n;
  const int64_t max_chunks = (n + kRolloutRowsPerChunk - 1) / kRolloutRowsPerChunk;
  at::Tensor workspace = at::empty({2, batch, max_chunks, n}, attentions[0].options().dtype(at::kFloat));
  float* cur = workspace.data_ptr<float>();
  float* prev = cur + batch * max_chunks * n;
  int64_t prev_chunks = 0;
  const float keep = 1.0f - residual;

  for (int64_t l = static_cast<int64_t>(attentions.size()) - 1; l >= 0; --l) {
    const scalar_t* attn = attentions[l].data_ptr<scalar_t>();
    // v starts as e_0: the last block contributes only its class-token row.
    const bool first_step = prev_chunks == 0;
    const int64_t rows = first_step ? 1 : n;
    const int64_t chunks = (rows + kRolloutRowsPerChunk - 1) / kRolloutRowsPerChunk;
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(n);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, c = task % chunks;
        float* acc = cur + (b * max_chunks + c) * n;
        std::fill(acc, acc + n, 0.0f);
        const int64_t row_end = std::min(rows, (c + 1) * kRolloutRowsPerChunk);
        for (int64_t i = c * kRolloutRowsPerChunk; i < row_end; ++i) {
          float v_i = first_step ? 1.0f : 0.0f;
          for (int64_t pc = 0; pc < prev_chunks; ++pc) v_i += prev[(b * max_chunks + pc) * n + i];
          const scalar_t* row = attn + (b * heads * n + i) * n;
          const float s = fuse_row<scalar_t, F>(row, heads, head_stride, n, buf.data());
          const float w = v_i / (keep * s + residual);
          const float kw = keep * w;
          for (int64_t j = 0; j < n; ++j) acc[j] += kw * buf[j];
          acc[i] += residual * w;
        }
      }
    });
    std::swap(cur, prev);
    prev_chunks = chunks;
  }

  // Map: the class row's patch columns, renormalised over the patches.
  const int64_t patches = n - num_prefix_tokens;
  float* out_ptr = out.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* o = out_ptr + b * patches;
      double total = 0.0;
      for (int64_t j = 0; j < patches; ++j) {
        float v = 0.0f;
        for (int64_t pc = 0; pc < prev_chunks; ++pc) v += prev[(b * max_chunks + pc) * n + num_prefix_tokens + j];
        o[j] = v;
        total += v;
      }
      const float inv_total = static_cast<float>(1.0 / total);
      for (int64_t j = 0; j < patches; ++j) o[j] *= inv_total;
    }
  });
}

// A'_l = ((1 - r) * fusion(A_l) + r * I) / row sums, written into out (B, N, N) fp32.
template <typename scalar_t, HeadFusion F>
void rollout_layer_cpu(const at::Tensor& attention, float residual, at::Tensor& out) {
  const int64_t batch = attention.size(0), heads = attention.size(1), n = attention.size(2);
  const scalar_t* attn = attention.data_ptr<scalar_t>();
  float* out_ptr = out.data_ptr<float>();
  const float keep = 1.0f - residual;
  at::parallel_for(0, batch * n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / n, i = t % n;
      float* o = out_ptr + t * n;
      const float s = fuse_row<scalar_t, F>(attn + (b * heads * n + i) * n, heads, n * n, n, o);
      const float inv = 1.0f / (keep * s + residual);
      const float scale = keep * inv;
      for (int64_t j = 0; j < n; ++j) o[j] *= scale;
      o[i] += residual * inv;
    }
  });
}

template <typename Fn>
void dispatch_fusion(HeadFusion fusion, Fn&& fn) {
  switch (fusion) {
    case HeadFusion::kMean: fn(std::integral_constant<HeadFusion, HeadFusion::kMean>{}); break;
    case HeadFusion::kMax: fn(std::integral_constant<HeadFusion, HeadFusion::kMax>{}); break;
    case HeadFusion::kMin: fn(std::integral_constant<HeadFusion, HeadFusion::kMin>{}); break;
  }
}

at::Tensor layer_checked(const at::Tensor& attention, float residual, HeadFusion fusion) {
  const int64_t batch = attention.size(0), n = attention.size(2);
  at::Tensor out = at::empty({batch, n, n}, attention.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
#ifdef TRANSMIX_WITH_CUDA
  if (attention.is_cuda()) {
    rollout_layer_cuda(attention, residual, fusion, out);
    return out;
  }
#endif
  TRANSMIX_DISPATCH_FLOAT_TYPES(attention.scalar_type(), "rollout_layer_cpu", [&] {
    dispatch_fusion(fusion, [&](auto f) { rollout_layer_cpu<scalar_t, decltype(f)::value>(attention, residual, out); });
  });
  return out;
}

}  // namespace

at::Tensor attention_rollout_row(const std::vector<at::Tensor>& attentions, double residual,
                                 const std::string& head_fusion, int64_t num_prefix_tokens) {
  check_attentions(attentions, residual);
  const HeadFusion fusion = parse_head_fusion(head_fusion);
  const int64_t batch = attentions[0].size(0), n = attentions[0].size(2);
  TORCH_CHECK_VALUE(num_prefix_tokens >= 0 && num_prefix_tokens < n,
                    "num_prefix_tokens must be in [0, N) = [0, ", n, "), got ", num_prefix_tokens);
  at::Tensor out = at::empty({batch, n - num_prefix_tokens}, attentions[0].options().dtype(at::kFloat));
  if (batch == 0) return out;
  const float r = static_cast<float>(residual);
#ifdef TRANSMIX_WITH_CUDA
  if (attentions[0].is_cuda()) {
    attention_rollout_row_cuda(attentions, r, fusion, num_prefix_tokens, out);
    return out;
  }
#endif
  TRANSMIX_DISPATCH_FLOAT_TYPES(attentions[0].scalar_type(), "rollout_row_cpu", [&] {
    dispatch_fusion(fusion, [&](auto f) {
      rollout_row_cpu<scalar_t, decltype(f)::value>(attentions, r, num_prefix_tokens, out);
    });
  });
  return out;
}

at::Tensor attention_rollout_full(const std::vector<at::Tensor>& attentions, double residual,
                                  const std::string& head_fusion) {
  check_attentions(attentions, residual);
  const HeadFusion fusion = parse_head_fusion(head_fusion);
  const float r = static_cast<float>(residual);
  // The full product is O(L * N^3) whatever we do; at::bmm is the right tool for it.
  at::Tensor product = layer_checked(attentions.back(), r, fusion);
  for (int64_t l = static_cast<int64_t>(attentions.size()) - 2; l >= 0; --l) {
    product = at::bmm(product, layer_checked(attentions[l], r, fusion));
  }
  return product;
}

at::Tensor rollout_layer(const at::Tensor& attention, double residual, const std::string& head_fusion) {
  check_attentions({attention}, residual);
  return layer_checked(attention, static_cast<float>(residual), parse_head_fusion(head_fusion));
}

}  // namespace transmix
