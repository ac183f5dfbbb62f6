// The fold of a split walk's segment pieces (chunk_sm90.h): a few MB of fp32 states, read
// once, in a fixed order (deterministic).
#include "chunk/chunk_states_sm90.h"
#include "common/cuda_check.h"

namespace fla {

namespace {

constexpr int kFoldThreads = 256;

__global__ void __launch_bounds__(kFoldThreads) chunk_seg_fold_kernel(const __grid_constant__ SegFoldParams f) {
  const int64_t vec = int64_t(blockIdx.x) * kFoldThreads + threadIdx.x;   // float4 index in a state
  const int h = blockIdx.y, seg = blockIdx.z % (f.num_segs - 1), n = blockIdx.z / (f.num_segs - 1);
  const int64_t first = (int64_t(n) * f.num_segs + seg) * f.parts;   // the segment's first piece
  const int64_t out = int64_t(n) * f.num_segs + seg;
  if (vec * 4 >= f.state_elems) return;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float gate = 0.f;
  for (int j = 0; j < f.parts; ++j) {
    const float gj = f.part_gates[(first + j) * f.H + h];
    const float a = exp2f(gj);
    const float4 u = reinterpret_cast<const float4*>(f.part_states + ((first + j) * f.H + h) * f.state_elems)[vec];
    acc = make_float4(a * acc.x + u.x, a * acc.y + u.y, a * acc.z + u.z, a * acc.w + u.w);
    gate += gj;
  }
  reinterpret_cast<float4*>(f.seg_states + (out * f.H + h) * f.state_elems)[vec] = acc;
  if (vec == 0) f.seg_gates[out * f.H + h] = gate;
}

}  // namespace

void run_chunk_seg_fold(const SegFoldParams& f, cudaStream_t stream) {
  const int64_t vecs = f.state_elems / 4;
  const dim3 grid(static_cast<unsigned>((vecs + kFoldThreads - 1) / kFoldThreads), f.H, f.N * (f.num_segs - 1));
  if (grid.x * grid.y * grid.z == 0) return;
  chunk_seg_fold_kernel<<<grid, kFoldThreads, 0, stream>>>(f);
  FLA_CHECK_LAUNCH();
}

}  // namespace fla
