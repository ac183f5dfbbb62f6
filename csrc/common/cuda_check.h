// Error checking shared by host code. Kernel translation units include only this
// (no torch headers), so they compile fast and independently.
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>
#include <string>

namespace fla {

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fla_cuda: CUDA error in ") + what + " at " + file + ":" +
                             std::to_string(line) + ": " + cudaGetErrorString(err));
  }
}

// Streaming multiprocessors of a device (queried once per device).
inline int sm_count(int device) {
  static int cached[64] = {};
  if (device >= 0 && device < 64 && cached[device] > 0) return cached[device];
  int count = 0;
  cuda_check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(MultiProcessorCount)", __FILE__, __LINE__);
  if (device >= 0 && device < 64) cached[device] = count;
  return count;
}

}  // namespace fla

#define FLA_CUDA_CHECK(expr) ::fla::cuda_check((expr), #expr, __FILE__, __LINE__)
// Every launch is followed by this: catches bad configurations at once (asynchronous
// faults surface at the next synchronising call, with the same message format).
#define FLA_CHECK_LAUNCH() ::fla::cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
