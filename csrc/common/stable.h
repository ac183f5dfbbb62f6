// Host-side helpers over PyTorch's stable ABI (the only torch API the extension uses).
#pragma once
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <optional>
#include <string>
#include <vector>

#include "common/switch.h"

namespace fla {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// The current CUDA stream of a device (launches follow PyTorch's stream semantics).
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device(), &stream) == AOTI_TORCH_SUCCESS,
                  "fla_cuda: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

inline DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    case ScalarType::Float: return DType::kFloat32;
    default: STD_TORCH_CHECK(false, "fla_cuda: `", name, "` must be float16, bfloat16 or float32");
  }
  return DType::kFloat32;
}

// Guards for direct torch.ops calls: the Python API validates first, these keep a
// malformed direct call from reaching a kernel.
inline void check_cuda_tensor(const Tensor& t, const char* name, const Tensor& like) {
  STD_TORCH_CHECK(t.is_cuda(), "fla_cuda: `", name, "` must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device() == like.get_device(), "fla_cuda: `", name, "` is on another device");
  STD_TORCH_CHECK(t.is_contiguous(), "fla_cuda: `", name, "` must be contiguous");
}

inline void check_sizes(const Tensor& t, const char* name, std::vector<int64_t> sizes) {
  STD_TORCH_CHECK(t.dim() == static_cast<int64_t>(sizes.size()), "fla_cuda: `", name, "` has the wrong rank");
  for (size_t i = 0; i < sizes.size(); ++i)
    STD_TORCH_CHECK(t.size(static_cast<int64_t>(i)) == sizes[i], "fla_cuda: `", name, "` has the wrong shape");
}

// Number of sequences: B, or N for packed sequences given as int64 cu_seqlens [N + 1] (B == 1).
inline int64_t check_cu_seqlens(const std::optional<Tensor>& cu_seqlens, const Tensor& like, int64_t B) {
  if (!cu_seqlens.has_value()) return B;
  check_cuda_tensor(*cu_seqlens, "cu_seqlens", like);
  STD_TORCH_CHECK(cu_seqlens->scalar_type() == ScalarType::Long && cu_seqlens->dim() == 1 &&
                      cu_seqlens->size(0) >= 2 && B == 1,
                  "fla_cuda: cu_seqlens must be int64 [N + 1] with B == 1");
  return cu_seqlens->size(0) - 1;
}

inline const float* opt_f32(const std::optional<Tensor>& t, const char* name, const Tensor& like,
                            std::vector<int64_t> sizes) {
  if (!t.has_value()) return nullptr;
  check_cuda_tensor(*t, name, like);
  STD_TORCH_CHECK(t->scalar_type() == ScalarType::Float, "fla_cuda: `", name, "` must be float32");
  check_sizes(*t, name, std::move(sizes));
  return static_cast<const float*>(t->data_ptr());
}

inline Tensor empty_f32(const Tensor& like, std::vector<int64_t> sizes) {
  return torch::stable::new_empty(like, sizes, ScalarType::Float);
}

inline Tensor nothing(const Tensor& like) { return empty_f32(like, {0}); }

}  // namespace fla
