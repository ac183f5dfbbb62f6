// Runtime values -> template constants (FlashAttention-style *_SWITCH macros).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

namespace fla {
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };
}

#define FLA_DTYPE_SWITCH(DTYPE, ELEM, ...)                                     \
  [&] {                                                                        \
    switch (DTYPE) {                                                           \
      case ::fla::DType::kFloat16: { using ELEM = __half; return __VA_ARGS__(); }        \
      case ::fla::DType::kBFloat16: { using ELEM = __nv_bfloat16; return __VA_ARGS__(); } \
      case ::fla::DType::kFloat32: { using ELEM = float; return __VA_ARGS__(); }         \
    }                                                                          \
    throw std::invalid_argument("fla_cuda: unsupported dtype");               \
  }()

// Head dim K -> the padded size a kernel is compiled for.
#define FLA_HEADDIM_SWITCH(K, KMAX, ...)                                       \
  [&] {                                                                        \
    if ((K) <= 64) { constexpr int KMAX = 64; return __VA_ARGS__(); }          \
    if ((K) <= 128) { constexpr int KMAX = 128; return __VA_ARGS__(); }        \
    if ((K) <= 256) { constexpr int KMAX = 256; return __VA_ARGS__(); }        \
    throw std::invalid_argument("fla_cuda: head dim K=" + std::to_string(K) + " > 256"); \
  }()
