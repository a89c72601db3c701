// Attention rollout: input checks, the CPU implementation (at::parallel_for) and dispatch.
// The math is derived in rollout.h.
#include "rollout.h"

#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <string>
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

// Numbers in messages go through std::to_string, never through the ostringstream TORCH_CHECK
// builds: with GCC 13.3 against torch 2.11 wheels (the GPU machines' image), inserting an integer
// there segfaulted (the num_put facet lookup ended in codecvt), while strings streamed fine.
std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t d = 0; d < sizes.size(); ++d) out += (d ? ", " : "") + std::to_string(sizes[d]);
  return out + ")";
}

// Everything is checked before any allocation or launch, so a failing call has no effect.
void check_attentions(const std::vector<at::Tensor>& attentions, double residual) {
  TORCH_CHECK_VALUE(!attentions.empty(), "attentions must be a non-empty list of (B, heads, N, N) tensors");
  const at::Tensor& first = attentions[0];
  for (size_t k = 0; k < attentions.size(); ++k) {
    const at::Tensor& a = attentions[k];
    const std::string name = "attentions[" + std::to_string(k) + "]";
    TORCH_CHECK_TYPE(a.defined(), name, " is an undefined tensor");
    TORCH_CHECK_VALUE(a.dim() == 4 && a.size(2) == a.size(3) && a.size(1) > 0 && a.size(2) > 0,
                      name, " must have shape (B, heads, N, N) with heads, N >= 1, got ", shape_str(a.sizes()));
    TORCH_CHECK_VALUE(a.sizes() == first.sizes(), name, " has shape ", shape_str(a.sizes()),
                      " but attentions[0] has shape ", shape_str(first.sizes()), "; all layers must match");
    const auto dtype = a.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                     name, " must have dtype float32, bfloat16 or float16, got ", c10::toString(dtype));
    TORCH_CHECK_TYPE(dtype == first.scalar_type(), name, " has dtype ", c10::toString(dtype),
                     " but attentions[0] has dtype ", c10::toString(first.scalar_type()), "; all layers must match");
    TORCH_CHECK_VALUE(a.device() == first.device(), name, " is on ", a.device().str(), " but attentions[0] is on ",
                      first.device().str(), "; all layers must be on one device");
    TORCH_CHECK_VALUE(a.is_contiguous(), name, " must be contiguous (call .contiguous())");
  }
  const auto device = first.device();
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), "attentions must be CPU or CUDA tensors, got ", device.str());
#ifndef TRANSMIX_WITH_CUDA
  TORCH_CHECK_VALUE(device.is_cpu(), "attentions are CUDA tensors but transmix_kernels._C was built without CUDA "
                    "(rebuild with a CUDA toolkit, or TRANSMIX_FORCE_CUDA=1)");
#endif
  TORCH_CHECK_VALUE(std::isfinite(residual) && residual >= 0.0 && residual <= 1.0,
                    "residual must be in [0, 1], got ", std::to_string(residual));
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TRANSMIX_F16C_RUNTIME 1
// Built for every x86-64 CPU, so c10::Half converts in software (~30x slower than bf16 here);
// the F16C instruction does 8 at a time and is checked for at run time.
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  for (; j < n; ++j) dst[j] = _cvtsh_ss(src[j].x);
}

bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

// One head's row as fp32: the input itself when it is fp32, else converted into tmp.
template <typename scalar_t>
inline const float* row_as_float(const scalar_t* src, int64_t n, float* tmp) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
#ifdef TRANSMIX_F16C_RUNTIME
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      if (cpu_has_f16c()) {
        half_to_float_f16c(src, tmp, n);
        return tmp;
      }
    }
#endif
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // bf16 is the top half of an fp32: a widening shift the compiler vectorises (the
      // c10::BFloat16 conversion operator does not get vectorised here).
      uint32_t* bits = reinterpret_cast<uint32_t*>(tmp);
      for (int64_t j = 0; j < n; ++j) bits[j] = static_cast<uint32_t>(src[j].x) << 16;
      return tmp;
    }
    for (int64_t j = 0; j < n; ++j) tmp[j] = static_cast<float>(src[j]);
    return tmp;
  }
}

// buf[j] (=) combine(buf[j], x_0[j], ..., x_{K-1}[j]), heads left to right as one sequential fold
// would do them; K heads per pass cuts the traffic through buf K-fold.
template <HeadFusion F, int K, bool kInit>
inline void fold_heads(float* __restrict__ buf, const float* const* x, int64_t n) {
  const float* __restrict__ x0 = x[0];
  const float* __restrict__ x1 = x[K > 1 ? 1 : 0];
  const float* __restrict__ x2 = x[K > 2 ? 2 : 0];
  const float* __restrict__ x3 = x[K > 3 ? 3 : 0];
  for (int64_t j = 0; j < n; ++j) {
    float a = kInit ? x0[j] : combine<F>(buf[j], x0[j]);
    if constexpr (K > 1) a = combine<F>(a, x1[j]);
    if constexpr (K > 2) a = combine<F>(a, x2[j]);
    if constexpr (K > 3) a = combine<F>(a, x3[j]);
    buf[j] = a;
  }
}

constexpr int kHeadsPerPass = 4;
constexpr int64_t kRowScratch = 1 + kHeadsPerPass;  // the fused row + converted heads

// Sum over heads (mean: divided by heads later), max or min, of A[b, :, i, :] into buf (fp32);
// returns sum_j of the fused row. row points at A[b, 0, i, 0]; head h starts head_stride
// elements further; tmp: kHeadsPerPass * n floats for converting low-precision heads.
template <typename scalar_t, HeadFusion F>
inline float fuse_row(const scalar_t* row, int64_t heads, int64_t head_stride, int64_t n, float* buf, float* tmp) {
  for (int64_t h0 = 0; h0 < heads; h0 += kHeadsPerPass) {
    const int k = static_cast<int>(std::min<int64_t>(kHeadsPerPass, heads - h0));
    const float* x[kHeadsPerPass];
    for (int q = 0; q < k; ++q) x[q] = row_as_float(row + (h0 + q) * head_stride, n, tmp + q * n);
    const bool init = h0 == 0;
    switch (k) {
      case 1: init ? fold_heads<F, 1, true>(buf, x, n) : fold_heads<F, 1, false>(buf, x, n); break;
      case 2: init ? fold_heads<F, 2, true>(buf, x, n) : fold_heads<F, 2, false>(buf, x, n); break;
      case 3: init ? fold_heads<F, 3, true>(buf, x, n) : fold_heads<F, 3, false>(buf, x, n); break;
      default: init ? fold_heads<F, 4, true>(buf, x, n) : fold_heads<F, 4, false>(buf, x, n); break;
    }
  }
  if constexpr (F == HeadFusion::kMean) {
    const float inv_heads = 1.0f / static_cast<float>(heads);
    for (int64_t j = 0; j < n; ++j) buf[j] *= inv_heads;
  }
  return row_sum(buf, n);
}

// The class-token row: v <- v @ A'_l for l = L .. 1, as steps s = 0 .. L-1 (step s reads block
// L-1-s). A step is split into (batch, chunk of rows) pieces; a piece writes its own partial v
// into workspace[s % 2][b][c], and the next step sums the partials of the rows it needs. Every
// value is therefore computed by one fixed sequence of operations, whichever schedule runs it.
template <typename scalar_t, HeadFusion F>
class RowChain {
 public:
  RowChain(const std::vector<at::Tensor>& attentions, float residual, int64_t num_prefix_tokens)
      : steps_(static_cast<int64_t>(attentions.size())),
        batch_(attentions[0].size(0)),
        heads_(attentions[0].size(1)),
        n_(attentions[0].size(2)),
        max_chunks_((n_ + kRolloutRowsPerChunk - 1) / kRolloutRowsPerChunk),
        num_prefix_tokens_(num_prefix_tokens),
        residual_(residual) {
    for (int64_t s = 0; s < steps_; ++s) layers_.push_back(attentions[steps_ - 1 - s].data_ptr<scalar_t>());
    workspace_ = at::empty({2, batch_, max_chunks_, n_}, attentions[0].options().dtype(at::kFloat));
  }

  int64_t steps() const { return steps_; }
  int64_t batch() const { return batch_; }
  int64_t n() const { return n_; }
  // v starts as e_0: the first step reads only the class-token row of the last block.
  int64_t chunks(int64_t step) const { return step == 0 ? 1 : max_chunks_; }

  // One piece of step s: rows of chunk c of sample b. buf: kRowScratch * n floats.
  void piece(int64_t step, int64_t b, int64_t c, float* buf) const {
    const float keep = 1.0f - residual_;
    const int64_t rows = step == 0 ? 1 : n_;
    const float* prev = partials(step - 1, b);
    const int64_t prev_chunks = step == 0 ? 0 : chunks(step - 1);
    float* acc = partials(step, b) + c * n_;
    std::fill(acc, acc + n_, 0.0f);
    const int64_t row_end = std::min(rows, (c + 1) * kRolloutRowsPerChunk);
    for (int64_t i = c * kRolloutRowsPerChunk; i < row_end; ++i) {
      float v_i = step == 0 ? 1.0f : 0.0f;
      for (int64_t pc = 0; pc < prev_chunks; ++pc) v_i += prev[pc * n_ + i];
      const scalar_t* row = layers_[step] + (b * heads_ * n_ + i) * n_;
      const float s = fuse_row<scalar_t, F>(row, heads_, n_ * n_, n_, buf, buf + n_);
      const float w = v_i / (keep * s + residual_);
      const float kw = keep * w;
      for (int64_t j = 0; j < n_; ++j) acc[j] += kw * buf[j];
      acc[i] += residual_ * w;
    }
  }

  // The map of sample b: patch columns of the final v, renormalised over the patches.
  void finish(int64_t b, float* out) const {
    const int64_t last = steps_ - 1;
    const float* v = partials(last, b);
    const int64_t patches = n_ - num_prefix_tokens_;
    float* o = out + b * patches;
    double total = 0.0;
    for (int64_t j = 0; j < patches; ++j) {
      float x = 0.0f;
      for (int64_t c = 0; c < chunks(last); ++c) x += v[c * n_ + num_prefix_tokens_ + j];
      o[j] = x;
      total += x;
    }
    const float inv_total = static_cast<float>(1.0 / total);
    for (int64_t j = 0; j < patches; ++j) o[j] *= inv_total;
  }

 private:
  float* partials(int64_t step, int64_t b) const {
    return workspace_.data_ptr<float>() + (((step & 1) * batch_ + b) * max_chunks_) * n_;
  }

  int64_t steps_, batch_, heads_, n_, max_chunks_, num_prefix_tokens_;
  float residual_;
  std::vector<const scalar_t*> layers_;
  at::Tensor workspace_;
};

template <typename scalar_t, HeadFusion F>
void rollout_row_cpu(const std::vector<at::Tensor>& attentions, float residual, int64_t num_prefix_tokens,
                     at::Tensor& out) {
  const RowChain<scalar_t, F> chain(attentions, residual, num_prefix_tokens);
  float* out_ptr = out.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  if (chain.batch() % threads == 0 || chain.batch() >= 4 * threads) {
    // Enough samples to share out: one parallel region, each thread runs whole chains. One
    // barrier instead of one per block matters on a loaded machine.
    at::parallel_for(0, chain.batch(), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(kRowScratch * chain.n());
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t s = 0; s < chain.steps(); ++s) {
          for (int64_t c = 0; c < chain.chunks(s); ++c) chain.piece(s, b, c, buf.data());
        }
        chain.finish(b, out_ptr);
      }
    });
    return;
  }
  // Few samples: split each step over (sample, chunk of rows) too.
  for (int64_t s = 0; s < chain.steps(); ++s) {
    const int64_t chunks = chain.chunks(s);
    at::parallel_for(0, chain.batch() * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(kRowScratch * chain.n());
      for (int64_t t = begin; t < end; ++t) chain.piece(s, t / chunks, t % chunks, buf.data());
    });
  }
  at::parallel_for(0, chain.batch(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) chain.finish(b, out_ptr);
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
    std::vector<float> tmp(kHeadsPerPass * n);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / n, i = t % n;
      float* o = out_ptr + t * n;
      const float s = fuse_row<scalar_t, F>(attn + (b * heads * n + i) * n, heads, n * n, n, o, tmp.data());
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
  TORCH_CHECK_VALUE(num_prefix_tokens >= 0 && num_prefix_tokens < n, "num_prefix_tokens must be in [0, N) = [0, ",
                    std::to_string(n), "), got ", std::to_string(num_prefix_tokens));
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
