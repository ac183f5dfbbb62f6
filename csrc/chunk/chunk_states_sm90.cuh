// The state-only launch of a split scalar-gate walk (chunk.h) on Hopper: each segment's
// local state from zero,
//   S^T <- exp(G_last) S^T + Vs^T K,        Vs = V * exp(G_last - G) * scale_update,
// chunk after chunk (Vs^T made in registers, as in the pass), and its total log2 gate. The
// full pass (chunk_pass_sm90.cuh) then folds these in at each segment's start.
//
// Its own kernel because the state alone is a stream: per chunk 24-32 KB of k and v in, one
// wgmma, nothing out. The full pass's state-only mode (one 256-thread block of 210 registers
// per SM, loads one chunk ahead) moved about 2.3 TB/s (bench/NOTES.md, session 10). Here:
//   - a block owns 128 value columns, two warpgroups of 64, so k is read once per head, not
//     once per 64 columns;
//   - three stages of k and v, loads two chunks ahead, 128 registers: two blocks per SM;
//   - each full segment of the pass is cut into `parts` pieces so that the grid fills the
//     GPU; chunk_seg_fold (seg_fold.cu) folds the pieces, in order, into the pass's
//     segment states.
#pragma once
#include <cute/tensor.hpp>

#include "chunk/chunk_pass_sm90.cuh"
#include "chunk/chunk_states_sm90.h"

namespace fla {
namespace chunk_sm90 {

template <typename Elem_, int DK_>
struct StatesTraits {
  using Pass = Traits<Elem_, DK_>;   // the pass's tile layouts and its state-update MMA
  using Elem = typename Pass::Elem;
  static constexpr int C = kChunk, DK = DK_, BV = Pass::BV, kWgs = 2, kThreads = 128 * kWgs, kStages = 3;
  static constexpr int kK = C * DK, kV = C * BV;
  // per stage: k (C, DK), then one (C, BV) tile of v per warpgroup; then fp32 gates and the
  // update's row weights, [kStages][C] each
  static constexpr int kStage = kK + kWgs * kV;
  static constexpr int kBytes = kStages * kStage * int(sizeof(Elem)) + 2 * kStages * C * int(sizeof(float));
  static constexpr int kAlign = Pass::kAlign;
};

template <typename Elem_, int DK>
__global__ void __launch_bounds__(256, 2) chunk_states_sm90_kernel(const __grid_constant__ SegStateParams sp) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tr = StatesTraits<Elem_, DK>;
  using Elem = typename Tr::Elem;
  constexpr int C = Tr::C, BV = Tr::BV, kStages = Tr::kStages, kWg = 128;
  const ChunkParams& p = sp.pass;

  extern __shared__ unsigned char smem_raw[];
  Elem* const smem = aligned_smem<Elem, Tr::kAlign>(smem_raw);
  float* const g_buf = reinterpret_cast<float*>(smem + kStages * Tr::kStage);   // [kStages][C] log2
  float* const w_buf = g_buf + kStages * C;                                       // [kStages][C]

  // blockIdx.z = (n * (num_segs - 1) + seg) * parts + part: piece `part` of segment `seg` of
  // sequence n (not of the last segment: nobody starts after it)
  const int h = blockIdx.y, part = blockIdx.z % sp.parts, seg = blockIdx.z / sp.parts % (p.num_segs - 1),
            n = blockIdx.z / sp.parts / (p.num_segs - 1);
  const int wg = threadIdx.x / kWg, tid = threadIdx.x % kWg, lane = threadIdx.x % 32;
  const int tile = blockIdx.x * Tr::kWgs + wg;     // this warpgroup's 64 value columns
  const bool has_tile = tile * BV < p.DV;          // DV = 64: the second warpgroup only loads k
  const bool flip = p.reverse;
  const int64_t H = p.H, DV = p.DV;

  chunk::WalkSpan span = chunk::walk_span(p, n, seg);
  span.seg_begin += int64_t(part) * sp.part_chunks * C;
  span.seg_len = max(int64_t(0), min(span.seg_len - int64_t(part) * sp.part_chunks * C, int64_t(sp.part_chunks) * C));
  const int num_chunks = int((span.seg_len + C - 1) / C);
  const int64_t tok0 = flip ? span.bos + span.len - 1 : span.bos, tok_step = flip ? -1 : 1;
  auto token = [&](int64_t pos) { return tok0 + tok_step * pos; };

  // k: all 256 threads, 16-byte vectors at rows rk0 + j kRowsK; v: each warpgroup its tile
  constexpr int kVecK = DK / 8, kRowsK = Tr::kThreads / kVecK, kVecV = BV / 8, kRowsV = kWg / kVecV;
  const int rk0 = threadIdx.x / kVecK, ck = threadIdx.x % kVecK * 8, rv0 = tid / kVecV, cv = tid % kVecV * 8;
  int smem_off_k[C / kRowsK], smem_off_v[C / kRowsV];
  CUTE_UNROLL
  for (int j = 0; j < C / kRowsK; ++j) smem_off_k[j] = typename Tr::Pass::PlainQK{}(rk0 + j * kRowsK, ck);
  CUTE_UNROLL
  for (int j = 0; j < C / kRowsV; ++j) smem_off_v[j] = typename Tr::Pass::PlainV{}(rv0 + j * kRowsV, cv);
  const Elem* k = static_cast<const Elem*>(p.k) + h * DK;
  const Elem* v = static_cast<const Elem*>(p.v) + h * DV + tile * BV;
  const int64_t k_step = (flip ? -kRowsK : kRowsK) * H * DK, v_step = (flip ? -kRowsV : kRowsV) * H * DV;
  auto k_tile = [&](int stage) { return smem + stage * Tr::kStage; };
  auto v_tile = [&](int stage) { return smem + stage * Tr::kStage + Tr::kK + wg * Tr::kV; };
  auto load_chunk = [&](int c, int stage) {
    const int64_t pos0 = span.seg_begin + int64_t(c) * C;
    const int rows_left = int(min(int64_t(C), span.len - pos0));
    chunk::copy_chunk_rows<kRowsK>(k_tile(stage), smem_off_k, k, token(pos0 + rk0) * H * DK + ck, k_step, rk0,
                                   rows_left);
    if (has_tile)
      chunk::copy_chunk_rows<kRowsV>(v_tile(stage), smem_off_v, v, token(pos0 + rv0) * H * DV + cv, v_step, rv0,
                                     rows_left);
  };
  // Warp 0 fetches chunk c + 2's raw gates at chunk c and scans them at chunk c + 1.
  float raw_gate0 = 0.f, raw_gate1 = 0.f;
  auto fetch_gates = [&](int c) { chunk::fetch_gate_pair(p, h, span, c, lane, raw_gate0, raw_gate1); };
  auto scan_gates = [&](int stage) {
    scan_gates_and_weights(raw_gate0, raw_gate1, lane, g_buf + stage * C, w_buf + stage * C, p.scale_update);
  };
  const bool gate_warp = threadIdx.x < 32;

  typename Tr::Pass::MmaSURs mma_su;
  auto thr_su = mma_su.get_thread_slice(tid);
  Tensor accH = partition_fragment_C(mma_su, Shape<Int<BV>, Int<DK>>{});   // (MMA, 1, 1) S^T
  Tensor tHcH = thr_su.partition_C(make_identity_tensor(Shape<Int<BV>, Int<DK>>{}));
  CUTE_STATIC_ASSERT_V(size(accH) == size(tHcH));
  clear(accH);
  float gate_sum = 0.f;

  load_first_chunks<kStages>(num_chunks, load_chunk);
  if (gate_warp && num_chunks > 0) {
    fetch_gates(0);
    scan_gates(0);
    if (num_chunks > 1) fetch_gates(1);
  }
  for (int c = 0; c < num_chunks; ++c) {
    const int stage = c % kStages;
    cute::cp_async_wait<kStages - 2>();   // this thread's copies of chunk c
    __syncthreads();   // everyone's copies and gates of chunk c; chunk c - 1's wgmmas are done
    load_chunk_ahead<kStages>(c, num_chunks, load_chunk);
    cute::cp_async_fence();
    if (gate_warp && c + 1 < num_chunks) {
      scan_gates((c + 1) % kStages);
      if (c + 2 < num_chunks) fetch_gates(c + 2);
    }
    const float* G = g_buf + stage * C;
    const float g_last = G[C - 1];
    gate_sum += g_last;
    if (has_tile) {
      // this warpgroup's v tile, scaled, in registers: the update's A operand
      Tensor tHrVs = make_vt_fragment<Elem>();   // (MMA, 1, C/16)
      load_scaled_vt<Elem, BV>(v_tile(stage), w_buf + stage * C, tid / 32, lane, tHrVs);
      const float a = exp2_ftz(g_last);
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i) accH(i) *= a;
      Tensor sKt = make_tensor(make_smem_ptr(k_tile(stage)), typename Tr::Pass::LayoutKt{});   // (DK, C)
      Tensor tHrK = thr_su.partition_fragment_B(sKt);     // (MMA, 1, C/16)
      wgmma_issue(mma_su, tHrVs, tHrK, accH, false);
      warpgroup_wait<0>();
      fence_operand(accH);
    }
  }
  if (!has_tile) return;

  // [N * num_segs * parts, H, DK, DV] in the pass's orientation
  const int64_t z = (int64_t(n) * p.num_segs + seg) * sp.parts + part;
  float* u = sp.part_states + (z * H + h) * DK * DV + int64_t(tile) * BV;
  CUTE_UNROLL
  for (int i = 0; i < size(accH); ++i) u[get<1>(tHcH(i)) * DV + get<0>(tHcH(i))] = accH(i);
  if (blockIdx.x == 0 && threadIdx.x == 0) sp.part_gates[z * H + h] = gate_sum;
#else
  __trap();   // built without sm_90a: the host never launches this (chunk_pass_sm90_built)
#endif
}

}  // namespace chunk_sm90

template <typename Elem, int DK>
void run_chunk_states_sm90(const SegStateParams& sp, cudaStream_t stream) {
  using Tr = chunk_sm90::StatesTraits<Elem, DK>;
  auto kernel = chunk_sm90::chunk_states_sm90_kernel<Elem, DK>;
  const int smem = Tr::kBytes + Tr::kAlign;
  const ChunkParams& p = sp.pass;
  const dim3 grid((p.DV / Tr::BV + Tr::kWgs - 1) / Tr::kWgs, p.H, p.N * (p.num_segs - 1) * sp.parts);
  launch_with_smem(kernel, grid, Tr::kThreads, smem, smem, stream, sp);
}

template <typename Elem, int DK>
int chunk_states_sm90_blocks_per_sm() {
  using Tr = chunk_sm90::StatesTraits<Elem, DK>;
  const int smem = Tr::kBytes + Tr::kAlign;
  return blocks_per_sm_with_smem(chunk_sm90::chunk_states_sm90_kernel<Elem, DK>, Tr::kThreads, smem, smem);
}

}  // namespace fla
