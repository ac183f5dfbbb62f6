// Launching a kernel that takes dynamic shared memory (nvcc-compiled sources only).
#pragma once
#include <cuda_runtime.h>

#include "common/cuda_check.h"

namespace fla {

// kernel<<<grid, threads, smem, stream>>>(params) after raising the kernel's dynamic shared
// memory limit to smem_limit (above 48 KB it must be raised); an empty grid launches nothing.
// The launch is checked.
template <typename Params>
void launch_with_smem(void (*kernel)(Params), dim3 grid, int threads, int smem, int smem_limit, cudaStream_t stream,
                      const Params& params) {
  FLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  kernel<<<grid, threads, smem, stream>>>(params);
  FLA_CHECK_LAUNCH();
}

// Blocks of `threads` threads and smem bytes of dynamic shared memory that fit one SM, after
// raising the kernel's limit to smem_limit as launch_with_smem does.
template <typename Params>
int blocks_per_sm_with_smem(void (*kernel)(Params), int threads, int smem, int smem_limit) {
  FLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit));
  int blocks = 0;
  FLA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  return blocks;
}

}  // namespace fla
