// The one pybind11 module of transmix_kernels._C: every op of csrc/ is bound here.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "cutmix_paste.h"
#include "rollout.h"

namespace {

// What this binary was built with; transmix_kernels._ext compares it with the running torch.
pybind11::dict build_info() {
  pybind11::dict info;
#ifdef TRANSMIX_WITH_CUDA
  info["built_with_cuda"] = true;
  info["cuda_version"] = transmix::cuda_build_version();
#else
  info["built_with_cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(__clang__) || defined(__GNUC__)
  info["compiler"] = std::string(__VERSION__);
#else
  info["compiler"] = pybind11::none();
#endif
  info["rollout_rows_per_chunk"] = transmix::kRolloutRowsPerChunk;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "transmix-kernels compiled ops (CPU; CUDA when built with TRANSMIX_WITH_CUDA)";
  m.def("attention_rollout_row", &transmix::attention_rollout_row, pybind11::arg("attentions"),
        pybind11::arg("residual"), pybind11::arg("head_fusion"), pybind11::arg("num_prefix_tokens"),
        "Class-token row of the attention rollout: list of (B, heads, N, N) -> (B, N - num_prefix_tokens) "
        "float32, patch columns renormalised to sum 1.");
  m.def("attention_rollout_full", &transmix::attention_rollout_full, pybind11::arg("attentions"),
        pybind11::arg("residual"), pybind11::arg("head_fusion"),
        "Whole attention rollout A'_L @ ... @ A'_1: list of (B, heads, N, N) -> (B, N, N) float32.");
  m.def("rollout_layer", &transmix::rollout_layer, pybind11::arg("attention"), pybind11::arg("residual"),
        pybind11::arg("head_fusion"),
        "One layer A'_l: heads fused, residual added, rows renormalised: (B, heads, N, N) -> (B, N, N) float32.");
  m.def("cutmix_paste_cpu_", &transmix::cutmix_paste_cpu_, pybind11::arg("images"), pybind11::arg("boxes"),
        pybind11::arg("partner"),
        "In place: images[b][box b] = images[partner[b]][box b] on CPU tensors, gather then scatter, one memcpy "
        "per box row segment. images (B, C, H, W) contiguous or channels_last, boxes (B, 4), partner (B,) int64.");
  m.def("build_info", &build_info, "What this extension was built with.");
}
