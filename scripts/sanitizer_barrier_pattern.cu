// The two-warpgroup hand-over of the wgmma chunk passes, reduced to a few lines, to tell what
// compute-sanitizer's racecheck and synccheck make of it (not part of the extension):
//
//   state warpgroup (threads 128-255):  bar.sync 1, 256; [bar.sync 3, 128]; write X; bar.arrive 2, 256
//   output warpgroup (threads 0-127):   bar.sync 1, 256; bar.sync 2, 256; read X
//
// Every read of X(i) comes before the output warpgroup's bar.sync 1 of step i + 1, and the
// state warpgroup writes X(i + 1) only after that barrier completes: no race. On the H200
// (2026-11-30, CUDA 13.0 tools), with the plain runs clean:
//   - racecheck reports write/read hazards between those lines (8 over the program, the ones
//     listed in the two-barrier variant), also with the non-aligned barrier.sync /
//     barrier.arrive: it does not follow this hand-over;
//   - synccheck reports "Divergent thread(s) in block" and stops both variants; with
//     barrier.sync / barrier.arrive (no .aligned: the warpgroups reach one barrier from
//     different instructions, which .aligned, i.e. bar.sync, excludes) it reports 0 errors.
// The reports on chunk_pass_sm90 and chunk_pass_gla_sm90 have the same shape (bench/NOTES.md,
// session 15). Swap the two asm strings below to see the second case.
//
//   nvcc -O2 -arch=sm_90a -lineinfo -o /tmp/barrier_pattern scripts/sanitizer_barrier_pattern.cu
//   compute-sanitizer --tool racecheck /tmp/barrier_pattern
//   compute-sanitizer --tool synccheck /tmp/barrier_pattern
#include <cstdio>

__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// kThirdBarrier: the state warpgroup also syncs among itself each step (bar.sync 3, 128)
template <bool kThirdBarrier>
__global__ void hand_over(float* sums, int steps) {
  __shared__ float handed[128];
  const int t = threadIdx.x % 128;
  if (threadIdx.x >= 128) {
    for (int i = 0; i < steps; ++i) {
      named_sync(1, 256);   // the output warpgroup has read the previous step's X
      if (kThirdBarrier) named_sync(3, 128);
      handed[(t + 7) % 128] = float(i + t);   // written by another thread than the reader
      named_arrive(2, 256);
    }
  } else {
    float sum = 0.f;
    for (int i = 0; i < steps; ++i) {
      named_sync(1, 256);
      named_sync(2, 256);   // X of step i is in
      sum += handed[t];
    }
    sums[blockIdx.x * 128 + t] = sum;
  }
}

int main() {
  float* sums = nullptr;
  if (cudaMalloc(&sums, 4 * 128 * sizeof(float)) != cudaSuccess) return 1;
  hand_over<false><<<4, 256>>>(sums, 16);
  std::printf("two barriers: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  hand_over<true><<<4, 256>>>(sums, 16);
  std::printf("with bar.sync 3, 128 in the state warpgroup: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  cudaFree(sums);
  return 0;
}
