// The scalar-gate chunk pass (math in chunk.h) on Hopper warpgroup MMAs (wgmma): the same
// walk as chunk_kernel.cuh, for DK in {64, 128}, with the products reading q, k, v and the
// state from shared memory instead of through per-warp ldmatrix fragments.
//
// One thread block = one (64 value columns, head, sequence or segment), two warpgroups that
// split each chunk's work and run side by side (one warpgroup per block left the SM with one
// warp per scheduler: 70% of its cycles issued nothing):
//
//   state warpgroup: carries S^T (BV, DK) in fp32 registers, the accumulator of its update
//       S^T <- exp(G_last) S^T + Vs^T K,        Vs = V * exp(G_last - G) * scale_update,
//     and its copy in the input dtype ((BV, DK), K-major: the B operand of Q S; two copies, by
//     the parity of the chunk they enter), the loads of q, k, v (cp.async, Traits::kStages
//     stages: two chunks ahead at DK = 128) and the gates;
//   output warpgroup: Q K^T and Q S (two wgmma groups from shared memory, Q S running while
//     the scores are masked), P = (Q K^T) * D * scale_intra, O = diag(exp(G)) Q S * scale_inter
//     + P V (Q S's rows scaled in the accumulator, P V accumulated onto it), the output
//     epilogue (dots, row divisors, stores).
//
// Per chunk one barrier of both (chunk c's inputs, its gates and the state copy entering it
// are in), then each its wgmma. Until session 18 the state warpgroup computed X = Q S and
// handed it over in fp32 through shared memory (a second barrier, loads and adds on the
// output warpgroup's path, which is the walk's critical path): issuing Q S there took 5.6-6.5% off
// every walk. Accumulators have the m16n8 layout per warp (warp w of a warpgroup owns rows
// 16w..16w+15). The state copy and the output leave the registers by stmatrix. Shared tiles use
// the 128-byte swizzle of the SM80 pass: its plain layouts and the GMMA canonical ones put
// every element at the same byte (compared element by element on the host when this was
// written; any mismatch would fail every GPU test), so the threads' cp.async keep the plain
// offsets.
//
// Linear attention's normaliser (normalize.h) can ride along (kFold): in the backward's dq
// and dk passes its gradient (ChunkParams::norm_w); in the forward, den itself
// (ChunkParams::norm_den). There the state warpgroup keeps the key sums on tensor cores too
// (1^T K by MMAs with an all-ones A, while the state update runs) and writes the carry's hi and
// lo rows for the next chunk; the output warpgroup takes <q, carry> by one more wgmma next to
// Q K^T (N = 8, against those rows), adds the row sums of its masked scores, and divides O
// once P V is in. A first version on CUDA cores (the sums by loads and adds, <q, carry> by two lanes
// a row) added 45% to the pass's instructions and 35 us to its 125 at B=4, T=4096, H=16,
// K=V=128; this one adds 17 us.
#pragma once
#include <cute/tensor.hpp>

#include "chunk/chunk.h"
#include "chunk/chunk_kernel.cuh"
#include "chunk/chunk_sm90.h"
#include "chunk/chunk_walk.cuh"
#include "common/cuda_check.h"
#include "common/launch.cuh"

namespace fla {
namespace chunk_sm90 {

using namespace cute;
using chunk::copy_chunk_rows;
using chunk::cp_async_4;
using chunk::decay_mask_scores;
using chunk::exp2_ftz;
using chunk::raw_gate_at_token;
using chunk::scan_gate_pairs;

__device__ __forceinline__ void fence_view_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <typename Elem_, int DK_>
struct Traits {
  using Elem = typename chunk::CuteType<Elem_>::type;
  static constexpr int C = kChunk, DK = DK_, BV = kChunkValueTileSm90, kThreads = 256;
  static_assert(DK == 64 || DK == 128, "the wgmma pass holds S^T (64, DK) in one accumulator");

  // GMMA views of the tiles
  using LayoutQK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<C>, Int<DK>>{}));   // (C, DK)
  using LayoutKt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{}, Shape<Int<DK>, Int<C>>{},
                                          Step<_2, _1>{}));                                                 // (DK, C)
  using LayoutVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{}, Shape<Int<BV>, Int<C>>{}));  // (BV, C)
  using LayoutSt = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<BV>, Int<DK>>{}));  // (BV, DK)
  // the same bytes as plain swizzled offsets (row, column) for the threads
  using PlainQK = chunk::SmemTile<C, DK>;
  using PlainV = chunk::SmemTile<C, BV>;

  using MmaQK = decltype(make_tiled_mma(SM90::GMMA::ss_op_selector<Elem, Elem, float, Shape<Int<C>, Int<C>, Int<DK>>,
                                                                   GMMA::Major::K, GMMA::Major::K>()));
  using MmaPV = decltype(make_tiled_mma(SM90::GMMA::rs_op_selector<Elem, Elem, float, Shape<Int<C>, Int<BV>, Int<C>>,
                                                                   GMMA::Major::K, GMMA::Major::MN>()));
  using MmaSU = decltype(make_tiled_mma(SM90::GMMA::ss_op_selector<Elem, Elem, float, Shape<Int<BV>, Int<DK>, Int<C>>,
                                                                   GMMA::Major::MN, GMMA::Major::MN>()));
  // the scalar-gate update takes V^T from registers, scaled there (no shared-memory round trip)
  using MmaSURs = decltype(make_tiled_mma(SM90::GMMA::rs_op_selector<Elem, Elem, float, Shape<Int<BV>, Int<DK>, Int<C>>,
                                                                     GMMA::Major::K, GMMA::Major::MN>()));

  using LayoutO = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<C>, Int<BV>>{}));    // (C, BV)
  // The forward normaliser (kFoldDen): Q carry^T against the carry's rows, and the chunk's key
  // sums 1^T K by m16n8k16 MMAs with an all-ones A, B read transposed by ldmatrix.
  using LayoutCt = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<_8, Int<DK>>{}));      // (8, DK)
  using MmaQc = decltype(make_tiled_mma(SM90::GMMA::ss_op_selector<Elem, Elem, float, Shape<Int<C>, _8, Int<DK>>,
                                                                   GMMA::Major::K, GMMA::Major::K>()));
  using MmaOnes = std::conditional_t<std::is_same_v<Elem, cute::bfloat16_t>, SM80_16x8x16_F32BF16BF16F32_TN,
                                     SM80_16x8x16_F32F16F16F32_TN>;
  static constexpr uint32_t kOnes = std::is_same_v<Elem, cute::bfloat16_t> ? 0x3F803F80u : 0x3C003C00u;
  // float16 carries are stored scaled (hi + lo keep 22 bits; 65504 would bound the sums)
  static constexpr float kCarryScale = std::is_same_v<Elem, cute::bfloat16_t> ? 1.f : 1.f / 1024.f;
  using StsmAtom = Copy_Atom<SM90_U32x4_STSM_N, Elem>;
  using LdsmAtom = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;

  // Stages of the loaded tiles: loads run kStages - 1 chunks ahead. Three at DK = 128 (one
  // block per SM: shared memory to spare; one chunk ahead left the loads of 128 blocks about one
  // chunk's compute time to arrive); two at DK = 64, where two blocks share an SM.
  static constexpr int kStages = DK == 128 ? 3 : 2;
  // Shared memory in elements from a 1024-byte aligned base: kStages stages of q, k, v; S^T twice
  // (by chunk parity); two stages of the forward normaliser's carry (8, DK) (rows hi, lo, zeros);
  // then fp32: two stages (by chunk parity) of gates and the update's row weights, kStages stages (loaded
  // with the tiles) of row divisors (or the normaliser's weights), the normaliser's carry rows
  // and the raw gates; the dots partner (kStages stages) last, allocated only when a pass has dots.
  static constexpr int kQK = C * DK, kV = C * BV, kSt = BV * DK, kCt = 8 * DK;   // kCt: one stage of the carry
  static constexpr int kOffQ = 0, kOffK = kStages * kQK, kOffV = 2 * kStages * kQK, kOffSt = kOffV + kStages * kV;
  static constexpr int kOffCt = kOffSt + 2 * kSt, kOffF32 = kOffCt + 2 * kCt;
  // the fp32 part in floats, padded so that the dots partner starts on a kAlign boundary (its
  // ldmatrix reads assume the swizzle's absolute addresses)
  static constexpr int kAlign = 1024;   // the swizzle and the GMMA descriptors use absolute addresses
  static constexpr int kF32 = ((4 + 2 * kStages) * C + kStages * BV + kAlign / 4 - 1) / (kAlign / 4) * (kAlign / 4);
  static_assert(kOffF32 * int(sizeof(Elem)) % kAlign == 0, "the fp32 part starts aligned");
  static constexpr int kBytesNoDots = kOffF32 * int(sizeof(Elem)) + kF32 * int(sizeof(float));
  static constexpr int kBytesDots = kBytesNoDots + kStages * kV * int(sizeof(Elem));
  // DK = 64: two blocks per SM when the kernel keeps to 128 registers. Stated in the launch
  // bound, not left to the compiler: an unrelated change once took it to 145 (one block per
  // SM, the B=8, T=2048, H=32 walks in two waves: 126 against about 90 us).
  static constexpr int kMinBlocks = DK == 64 ? 2 : 1;
};

// acc += A B over all k blocks of A (MMA, M, K) and B (MMA, N, K); zero_init overwrites acc.
template <class Mma, class TA, class TB, class Acc>
__device__ __forceinline__ void wgmma_k(Mma& mma, TA const& tA, TB const& tB, Acc& acc, bool zero_init) {
  CUTE_STATIC_ASSERT_V(size<2>(tA) == size<2>(tB));
  mma.accumulate_ = zero_init ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    cute::gemm(mma, tA(_, _, kb), tB(_, _, kb), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
}

template <class T>
__device__ __forceinline__ void fence_operand(T& frag) {
  CUTE_UNROLL
  for (int i = 0; i < size(frag); ++i) warpgroup_fence_operand(frag(i));
}

// acc (+)= A B issued as one wgmma group, not waited for.
template <class Mma, class TA, class TB, class Acc>
__device__ __forceinline__ void wgmma_issue(Mma& mma, TA const& tA, TB const& tB, Acc& acc, bool zero_init) {
  fence_operand(acc);
  warpgroup_arrive();
  wgmma_k(mma, tA, tB, acc, zero_init);
  warpgroup_commit_batch();
}

// The tile loads' pipeline of kStages = S stages: chunk c in stage c % S, loaded S - 1 chunks
// before its turn, each chunk's loads one cp.async commit group (empty past the last chunk), so
// that cp_async_wait<S - 2>() at chunk c's turn means chunk c is in. The first S - 1 chunks:
template <int S, class Load>
__device__ __forceinline__ void load_first_chunks(int num_chunks, Load& load_chunk) {
  CUTE_UNROLL
  for (int j = 0; j < S - 1; ++j) {
    if (j < num_chunks) load_chunk(j, j);
    cp_async_fence();
  }
}
// at chunk c's turn, chunk c + S - 1 into the stage chunk c - 1 freed (the caller commits)
template <int S, class Load>
__device__ __forceinline__ void load_chunk_ahead(int c, int num_chunks, Load& load_chunk) {
  if (c + S - 1 < num_chunks) load_chunk(c + S - 1, (c + S - 1) % S);
}

// Named barriers (0 is __syncthreads): the chunk's inputs are in (both warpgroups); X is
// written (GLA mode's pass: its state warpgroup arrives, its output warpgroup waits). The
// non-aligned forms:
// the two warpgroups reach one barrier from different instructions, which bar.sync (=
// barrier.sync.aligned) excludes; synccheck flags it (scripts/sanitizer_barrier_pattern.cu).
enum : int { kBarChunk = 1, kBarX = 2 };
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("barrier.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int threads) {
  asm volatile("barrier.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The dynamic shared memory from a kAlign-byte boundary, as an offset from the shared array (a
// rounded integer address would lose the shared state space: generic loads and stores).
template <typename Elem, int kAlign>
__device__ __forceinline__ Elem* aligned_smem(unsigned char* smem_raw) {
  const uint32_t misalign = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & (kAlign - 1);
  return reinterpret_cast<Elem*>(smem_raw + ((kAlign - misalign) & (kAlign - 1)));
}

// What of linear attention's normaliser a pass folds in: nothing, its gradient (the dq and dk
// passes of the backward, ChunkParams::norm_w) or den and the division (the forward,
// ChunkParams::norm_den).
enum NormFold : int { kFoldNone = 0, kFoldGrad = 1, kFoldDen = 2 };

// Element offset of (r, c) in the plain (C, DK) tile of q or k for run-time coordinates:
// 64-column blocks of tile64_offset's layout, one after the other.
template <int DK>
__host__ __device__ constexpr int qk_offset(int r, int c) {
  return c / 64 * (kChunk * 64) + chunk::tile64_offset(r, c % 64);
}
template <int DK>   // the first and last element of every 16-byte group (the compiler's budget)
constexpr bool qk_offset_matches() {
  for (int r = 0; r < kChunk; ++r)
    for (int c = 0; c < DK; c += c % 8 == 0 ? 7 : 1)
      if (chunk::SmemTile<kChunk, DK>{}(r, c) != qk_offset<DK>(r, c)) return false;
  return true;
}
static_assert(qk_offset_matches<64>(), "qk_offset is the (C, 64) tile's layout");
static_assert(qk_offset_matches<128>(), "qk_offset is the (C, 128) tile's layout");
// The same for the normaliser's (8, DK) carry tile (Traits::LayoutCt; the plain layout of its
// bytes, as for the other tiles).
__host__ __device__ constexpr int carry_offset(int r, int c) { return c / 64 * (8 * 64) + chunk::tile64_offset(r, c % 64); }
template <int DK>
constexpr bool carry_offset_matches() {
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < DK; c += c % 8 == 0 ? 7 : 1)
      if (chunk::SmemTile<8, DK>{}(r, c) != carry_offset(r, c)) return false;
  return true;
}
static_assert(carry_offset_matches<64>() && carry_offset_matches<128>(), "carry_offset is the carry tile's layout");

// One warp's scan of a chunk's gates (scan_gate_pairs, into G) and the state update's row
// weights w = 2^(G_last - G) * scale_update from it (into w).
__device__ __forceinline__ void scan_gates_and_weights(float raw0, float raw1, int lane, float* G, float* w,
                                                       float scale_update) {
  scan_gate_pairs(raw0, raw1, lane, G);
  __syncwarp();
  const float2 g = *reinterpret_cast<const float2*>(G + 2 * lane);
  const float g_last = G[kChunk - 1];
  *reinterpret_cast<float2*>(w + 2 * lane) =
      make_float2(exp2_ftz(g_last - g.x) * scale_update, exp2_ftz(g_last - g.y) * scale_update);
}

// The state update's A operand Vs^T = V^T diag(w) (BV, C) in registers, in the accumulator
// layout read as A (value 8 kb + 2 j + e: value column 16 warp + lane / 4 + 8 (j % 2), chunk
// row 16 kb + 8 (j / 2) + 2 (lane % 4) + e): ldmatrix.trans of the (C, BV) v tile gives
// register j of k-block kb, and each chunk row's weight scales it in fp32 (one rounding).
// Through shared memory (scaled in place, read by an SS wgmma) it cost a generic-to-async
// proxy fence and a barrier per chunk.
template <typename Elem, int BV, class Frag>
__device__ __forceinline__ void load_scaled_vt(const Elem* v_tile, const float* w, int warp, int lane, Frag& rVs) {
  CUTE_STATIC_ASSERT_V(size(rVs) == Int<kChunk * BV / 128>{});
  const int mat = lane / 8;
  CUTE_UNROLL
  for (int kb = 0; kb < kChunk / 16; ++kb) {
    const int row = 16 * kb + 8 * (mat / 2) + lane % 8, col = 16 * warp + 8 * (mat % 2);
    uint32_t r[4];
    SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(v_tile + qk_offset<BV>(row, col)), r[0], r[1],
                            r[2], r[3]);
    const float2 w_lo = *reinterpret_cast<const float2*>(w + 16 * kb + 2 * (lane % 4));
    const float2 w_hi = *reinterpret_cast<const float2*>(w + 16 * kb + 8 + 2 * (lane % 4));
    CUTE_UNROLL
    for (int j = 0; j < 4; ++j) {
      const float2 wj = j < 2 ? w_lo : w_hi;
      const float2 x = chunk::unpack_pair<Elem>(r[j]);
      const uint32_t y = chunk::pack_pair<Elem>(x.x * wj.x, x.y * wj.y);
      rVs(8 * kb + 2 * j) = reinterpret_cast<const Elem*>(&y)[0];
      rVs(8 * kb + 2 * j + 1) = reinterpret_cast<const Elem*>(&y)[1];
    }
  }
}

// A register fragment for load_scaled_vt: (MMA, 1, C/16), the accumulator layout read as A.
template <typename Elem>
__device__ __forceinline__ auto make_vt_fragment() {
  return make_tensor<Elem>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kChunk / 16>>, Stride<Stride<_1, _2, _4>, _0, _8>>{});
}

template <typename Elem_, int DK, int kFold = kFoldNone>
__global__ void __launch_bounds__(256, Traits<Elem_, DK>::kMinBlocks) chunk_pass_sm90_kernel(const __grid_constant__ ChunkParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tr = Traits<Elem_, DK>;
  using Elem = typename Tr::Elem;
  constexpr int C = Tr::C, BV = Tr::BV, kWg = 128, S = Tr::kStages;
  constexpr bool kNorm = kFold == kFoldGrad, kDen = kFold == kFoldDen;

  extern __shared__ unsigned char smem_raw[];
  Elem* const smem = aligned_smem<Elem, Tr::kAlign>(smem_raw);
  Elem* const q_buf = smem + Tr::kOffQ;     // [S][C*DK]
  Elem* const k_buf = smem + Tr::kOffK;     // [S][C*DK]
  Elem* const v_buf = smem + Tr::kOffV;     // [S][C*BV]
  Elem* const st_buf = smem + Tr::kOffSt;   // [2][BV*DK] S^T in the input dtype, by the parity of the chunk it enters
  Elem* const ct_buf = smem + Tr::kOffCt;   // [2][8*DK] the normaliser's carry, hi and lo rows (kDen)
  float* const g_buf = reinterpret_cast<float*>(smem + Tr::kOffF32);   // [2][C] cumulative gates (log2)
  float* const div_buf = g_buf + 2 * C;        // [S][C] output row divisors, or the normaliser's w
  float* const carry_buf = div_buf + S * C;    // [S][BV] the normaliser's carry at each chunk's start
  float* const w_buf = carry_buf + S * BV;     // [2][C] the update's row weights 2^(G_last - G) * scale_update
  float* const raw_buf = w_buf + 2 * C;        // [S][C] per-step raw gates (cp.async), chunk c in slot c % S
  Elem* const dot_buf = reinterpret_cast<Elem*>(g_buf + Tr::kF32);    // [S][C*BV] rows of dot_with

  const int tile = blockIdx.x, h = blockIdx.y, n = blockIdx.z / p.num_segs, seg = blockIdx.z % p.num_segs;
  const bool flip = p.reverse;
  const bool state_wg = threadIdx.x >= kWg;            // warpgroup 1: the state; 0: the output
  const int tid = threadIdx.x % kWg, warp = tid / 32, lane = tid % 32;
  const int64_t H = p.H, DV = p.DV;
  const chunk::WalkSpan span = chunk::walk_span(p, n, seg);
  const int64_t bos = span.bos, len = span.len, seg_begin = span.seg_begin;
  const int num_chunks = span.num_chunks;
  const int64_t tok0 = flip ? bos + len - 1 : bos, tok_step = flip ? -1 : 1;
  auto token = [&](int64_t pos) { return tok0 + tok_step * pos; };

  // Loads: thread tid of a warpgroup moves 16-byte vectors at rows r0 + j * kRows of a chunk;
  // rows past the end are zero-filled from the tensor's first row (never read).
  constexpr int kVecQK = DK / 8, kRowsQK = kWg / kVecQK, kVecV = BV / 8, kRowsV = kWg / kVecV;
  const int rq0 = tid / kVecQK, cq = tid % kVecQK * 8, rv0 = tid / kVecV, cv = tid % kVecV * 8;
  int smem_off_v[C / kRowsV];
  CUTE_UNROLL
  for (int j = 0; j < C / kRowsV; ++j) smem_off_v[j] = typename Tr::PlainV{}(rv0 + j * kRowsV, cv);
  const int64_t v_step = (flip ? -kRowsV : kRowsV) * H * DV;
  const Elem* v = static_cast<const Elem*>(p.v) + h * DV + tile * BV;

  // Gates: warp 0 of the state warpgroup fetches chunk c + S's per-step gates by cp.async with
  // chunk c + S - 1's tiles, and scans chunk c + 1's after chunk c's state update (off the output
  // warpgroup, whose work is the critical path). Not into registers: a wgmma's warpgroup.arrive
  // waits for every pending register write, so an outstanding gate load stalled the next wgmma
  // (the scan in either warpgroup with register loads cost 15-30 us per walk).
  auto gate_pos = [&](int c, int e) { return seg_begin + int64_t(c) * C + 2 * lane + e; };
  auto fetch_gates = [&](int c) {
    if (p.g == nullptr) return;   // g_gamma or no gate: nothing per step
    CUTE_UNROLL
    for (int e = 0; e < 2; ++e) {
      int64_t t;
      const bool valid = chunk::gate_token(p, span, gate_pos(c, e), t);
      cp_async_4(raw_buf + (c % S) * C + 2 * lane + e, p.g + (valid ? t * H + h : 0), valid);
    }
  };
  auto scan_gates = [&](int c) {   // and the state update's row weights from them
    float raw[2];
    CUTE_UNROLL
    for (int e = 0; e < 2; ++e)   // per step from the copies; g_gamma or none read directly
      raw[e] = p.g != nullptr ? raw_buf[(c % S) * C + 2 * lane + e] : chunk::raw_gate_at(p, h, span, gate_pos(c, e));
    scan_gates_and_weights(raw[0], raw[1], lane, g_buf + (c & 1) * C, w_buf + (c & 1) * C, p.scale_update);
  };

  typename Tr::MmaQK mma_qk;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  // The m16n8 accumulator structure of a 64 x 64 tile: value 4 nb + 2 h8 + e sits at row
  // r0 + 8 h8, column c0 + 8 nb + e.
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));
  const int r0 = get<0>(tScS(0)), c0 = get<1>(tScS(0));
  CUTE_STATIC_ASSERT_V(size(tScS) == Int<2 * C / 8 * 2>{});

  if (state_wg) {
    // ------------------------------------------------------------------ state warpgroup
    typename Tr::MmaSURs mma_su;
    auto thr_su = mma_su.get_thread_slice(tid);
    const Elem* q = static_cast<const Elem*>(p.q) + h * DK;
    const Elem* k = static_cast<const Elem*>(p.k) + h * DK;
    int smem_off_qk[C / kRowsQK];
    CUTE_UNROLL
    for (int j = 0; j < C / kRowsQK; ++j) smem_off_qk[j] = typename Tr::PlainQK{}(rq0 + j * kRowsQK, cq);
    const int64_t qk_step = (flip ? -kRowsQK : kRowsQK) * H * DK;
    auto load_chunk = [&](int c, int stage) {
      const int64_t pos0 = seg_begin + int64_t(c) * C;
      const int rows_left = int(min(int64_t(C), len - pos0));
      const int64_t qk_off = token(pos0 + rq0) * H * DK + cq;
      copy_chunk_rows<kRowsQK>(q_buf + stage * Tr::kQK, smem_off_qk, q, qk_off, qk_step, rq0, rows_left);
      copy_chunk_rows<kRowsQK>(k_buf + stage * Tr::kQK, smem_off_qk, k, qk_off, qk_step, rq0, rows_left);
      copy_chunk_rows<kRowsV>(v_buf + stage * Tr::kV, smem_off_v, v, token(pos0 + rv0) * H * DV + cv, v_step, rv0,
                rows_left);
    };

    // S^T (BV, DK) in fp32 registers: value i at (column v, key row d) of S.
    Tensor accH = partition_fragment_C(mma_su, Shape<Int<BV>, Int<DK>>{});   // (MMA, 1, 1)
    Tensor tHcH = thr_su.partition_C(make_identity_tensor(Shape<Int<BV>, Int<DK>>{}));
    CUTE_STATIC_ASSERT_V(size(accH) == size(tHcH));
    auto state_at = [&](int i, int64_t stride_k, int64_t stride_v) {   // offset of value i in a [DK, DV] state
      return get<1>(tHcH(i)) * stride_k + get<0>(tHcH(i)) * stride_v;
    };
    const int64_t state_off = (int64_t(n) * H + h) * DK * DV + int64_t(tile) * BV * p.state_stride_v;
    if (p.h0 != nullptr) {
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i) accH(i) = p.h0[state_off + state_at(i, p.state_stride_k, p.state_stride_v)];
    } else {
      clear(accH);
    }
    // segment s > 0 of a split walk: fold in the segments before it, in order
    auto seg_state_off = [&](int s) { return ((int64_t(n) * p.num_segs + s) * H + h) * DK * DV + int64_t(tile) * BV; };
    for (int s = 0; s < seg; ++s) {
      const float* u = p.seg_states + seg_state_off(s);
      const float a = exp2_ftz(p.seg_gates[(int64_t(n) * p.num_segs + s) * H + h]);
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i) accH(i) = a * accH(i) + u[state_at(i, DV, 1)];
    }
    auto sts_state = make_tiled_copy_C(typename Tr::StsmAtom{}, mma_su);
    auto sts_state_thr = sts_state.get_thread_slice(tid);
    Tensor tHsSt0 = sts_state_thr.partition_D(make_tensor(make_smem_ptr(st_buf), typename Tr::LayoutSt{}));
    Tensor tHsSt1 = sts_state_thr.partition_D(make_tensor(make_smem_ptr(st_buf + Tr::kSt), typename Tr::LayoutSt{}));
    auto store_state_smem = [&](int par) {   // the copy in the input dtype, by stmatrix
      Tensor rH = make_tensor_like<Elem>(accH);
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i) rH(i) = static_cast<Elem>(accH(i));
      if (par) copy(sts_state, sts_state_thr.retile_S(rH), tHsSt1);
      else copy(sts_state, sts_state_thr.retile_S(rH), tHsSt0);
    };

    // S - 1 commit groups ahead of the loop: group j holds chunk j's tiles and chunk j + 1's
    // raw gates (group 0 chunk 0's too); chunk 0's gates are scanned now
    if (num_chunks > 0) load_chunk(0, 0);
    if (warp == 0 && num_chunks > 0) fetch_gates(0);
    CUTE_UNROLL
    for (int j = 0; j < S - 1; ++j) {
      if (j > 0 && j < num_chunks) load_chunk(j, j);
      if (warp == 0 && j + 1 < num_chunks) fetch_gates(j + 1);
      cp_async_fence();
    }
    store_state_smem(0);
    if (warp == 0 && num_chunks > 0) {
      cp_async_wait<S - 2>();
      scan_gates(0);
    }

    // The forward normaliser (kDen): the key sums before each chunk (the carry) in the
    // accumulators of MMAs with an all-ones A: warp w sums the chunk's rows of its DK / 4
    // columns of k (every accumulator row holds the same sums; lanes 0-3 hand them on). The
    // carry goes to the output warpgroup (stage c & 1 of ct_buf, hi and lo rows: its product with
    // Q is <q, carry> to about 16 bits, fp32 accumulated) and, from value tile 0, to k_carry and
    // z_final.
    constexpr int kCarryBlocks = DK / 4 / 8;
    const int64_t norm_slot0 = chunk::walk_first_slot(p, n, seg_begin), z_row = (int64_t(n) * H + h) * DK;
    auto carry_col = [&](int nb) { return warp * (DK / 4) + 8 * nb + 2 * (lane % 4); };
    float carry[kCarryBlocks][4];
    // Every lane holds the sums of its column pair of every n-block (all accumulator rows are
    // the same): lane l stores row (l / 4) % 2 (hi, lo) of n-block l / 8, one store each and no
    // branch (lanes past the warp's n-blocks at DK = 64 store nothing, by predicate).
    auto put_carry = [&](int c) {   // the carry before chunk c (c == num_chunks: z_final)
      const int nb_mine = lane / 8, part = lane / 4 % 2;
      float2 z = make_float2(0.f, 0.f);
      CUTE_UNROLL
      for (int nb = 0; nb < kCarryBlocks; ++nb)
        if (nb == nb_mine) z = make_float2(carry[nb][0], carry[nb][1]);
      cute::array<Elem, 2> out;
      CUTE_UNROLL
      for (int e = 0; e < 2; ++e) {
        const float x = (e ? z.y : z.x) * Tr::kCarryScale;
        const Elem hi = static_cast<Elem>(x);
        out[e] = part == 0 ? hi : static_cast<Elem>(x - static_cast<float>(hi));
      }
      const int col = carry_col(nb_mine);
      const bool mine = nb_mine < kCarryBlocks;
      if (mine)
        *reinterpret_cast<uint32_t*>(ct_buf + (c & 1) * Tr::kCt + carry_offset(part, col)) =
            *reinterpret_cast<const uint32_t*>(out.data());
      if (mine && part == 0 && tile == 0) {
        float* dst = c < num_chunks ? p.norm_k_carry + ((norm_slot0 + c) * H + h) * DK : p.norm_z_final + z_row;
        *reinterpret_cast<float2*>(dst + col) = z;
      }
    };
    auto add_chunk_keys = [&](int stage) {   // carry += 1^T K of the chunk (zero-filled past the end)
      const Elem* ks = k_buf + stage * Tr::kQK;
      const uint32_t ones = Tr::kOnes;   // a register operand (the static member is host-only)
      CUTE_UNROLL
      for (int kb = 0; kb < C / 16; ++kb) {
        CUTE_UNROLL
        for (int np = 0; np < kCarryBlocks / 2; ++np) {   // two n-blocks of 8 columns per ldmatrix
          const int row = 16 * kb + 8 * (lane / 8 % 2) + lane % 8;
          const int col = warp * (DK / 4) + 16 * np + 8 * (lane / 16);
          uint32_t b[4];
          SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(ks + qk_offset<DK>(row, col)), b[0], b[1],
                                  b[2], b[3]);
          CUTE_UNROLL
          for (int j = 0; j < 2; ++j) {
            float(&d)[4] = carry[2 * np + j];
            Tr::MmaOnes::fma(d[0], d[1], d[2], d[3], ones, ones, ones, ones, b[2 * j], b[2 * j + 1], d[0], d[1], d[2],
                             d[3]);
          }
        }
      }
    };
    if constexpr (kDen) {
      CUTE_UNROLL
      for (int nb = 0; nb < kCarryBlocks; ++nb) {
        const float2 z = p.norm_z0 != nullptr ? *reinterpret_cast<const float2*>(p.norm_z0 + z_row + carry_col(nb))
                                               : make_float2(0.f, 0.f);
        carry[nb][0] = carry[nb][2] = z.x;
        carry[nb][1] = carry[nb][3] = z.y;
      }
      for (int i = tid; i < 2 * Tr::kCt; i += kWg)   // rows 2-7 (64-element spans) stay zero;
        if (i / 64 % 8 >= 2) ct_buf[i] = Elem(0);    // put_carry writes rows 0 and 1
      put_carry(0);
    }
    for (int c = 0; c < num_chunks; ++c) {
      const int stage = c % S, par = c & 1;   // tiles by stage; gates, weights, carries by parity
      cp_async_wait<S - 2>();            // group c: chunk c's tiles, chunk c + 1's raw gates
      fence_view_async_shared();         // this thread's copies and stores, to the wgmma proxy
      bar_sync(kBarChunk, 2 * kWg);      // chunk c, its gates and the state copy are visible
      const float g_last = g_buf[par * C + C - 1];
      load_chunk_ahead<S>(c, num_chunks, load_chunk);
      if (warp == 0 && c + S < num_chunks) fetch_gates(c + S);   // into chunk c's raw slot (scanned)
      cp_async_fence();
      // V^T scaled by each row's decay to the chunk end, the state update's A operand
      Tensor tHrVs = make_vt_fragment<Elem>();   // (MMA, 1, C/16)
      load_scaled_vt<Elem, BV>(v_buf + stage * Tr::kV, w_buf + par * C, warp, lane, tHrVs);
      const float a = exp2_ftz(g_last);
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i) accH(i) *= a;
      Tensor sKt = make_tensor(make_smem_ptr(k_buf + stage * Tr::kQK), typename Tr::LayoutKt{});  // (DK, C)
      Tensor tHrK = thr_su.partition_fragment_B(sKt);                        // (MMA, 1, C/16)
      CUTE_STATIC_ASSERT_V(size<2>(tHrVs) == size<2>(tHrK));
      wgmma_issue(mma_su, tHrVs, tHrK, accH, false);
      if constexpr (kDen) add_chunk_keys(stage);   // while the tensor cores update the state
      warpgroup_wait<0>();
      fence_operand(accH);
      if constexpr (kDen) put_carry(c + 1);
      store_state_smem(par ^ 1);   // read by the output warpgroup's Q S of chunk c + 1, after its barrier
      if (warp == 0 && c + 1 < num_chunks) scan_gates(c + 1);   // its raw gates came with chunk c
    }

    if (p.ht != nullptr && seg == p.num_segs - 1) {
      // reverse: the first step's gate still applies (dL/dS_{-1} = exp(g_0) dL/dS_0)
      const float a = (flip && len > 0) ? __expf(fmaxf(raw_gate_at_token(p, h, bos), kMinLogGate)) : 1.f;
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i)
        p.ht[state_off + state_at(i, p.state_stride_k, p.state_stride_v)] = accH(i) * a;
    }
  } else {
    // ------------------------------------------------------------------ output warpgroup
    typename Tr::MmaPV mma_pv;
    auto thr_pv = mma_pv.get_thread_slice(tid);
    typename Tr::MmaQc mma_qc;
    auto thr_qc = mma_qc.get_thread_slice(tid);
    const Elem* other = static_cast<const Elem*>(p.dot_with) + h * DV + tile * BV;
    const int64_t norm_slot0 = chunk::walk_first_slot(p, n, seg_begin);   // the normaliser's carry rows
    static_assert(C + BV == kWg && BV == C, "the normaliser's loads: a thread per row, then per column");
    // what the epilogue reads: dots partner, divisors (or the normaliser's weights and carry)
    auto load_chunk = [&](int c, int stage) {
      const int64_t pos0 = seg_begin + int64_t(c) * C;
      const int rows_left = int(min(int64_t(C), len - pos0));
      if (p.dots != nullptr)   // the dot partner has v's layout
        copy_chunk_rows<kRowsV>(dot_buf + stage * Tr::kV, smem_off_v, other, token(pos0 + rv0) * H * DV + cv, v_step,
                  rv0, rows_left);
      const float* row_vals = kNorm ? p.norm_w : (kDen ? nullptr : p.o_row_div);
      if (row_vals != nullptr && tid < C) {   // zeros past the end
        const bool valid = tid < rows_left;
        cp_async_4(div_buf + stage * C + tid, row_vals + (valid ? token(pos0 + tid) * H + h : 0), valid);
      }
      if (kNorm && tid >= C)
        cp_async_4(carry_buf + stage * BV + (tid - C),
                   p.norm_carry + ((norm_slot0 + c) * H + h) * DV + tile * BV + (tid - C), true);
    };
    auto sts_o = make_tiled_copy_C(typename Tr::StsmAtom{}, mma_qk);
    auto sts_o_thr = sts_o.get_thread_slice(tid);
    // O leaves through the chunk's q tile (read by both products, which are done): stmatrix
    // of this warp's rows, then 16-byte stores.
    auto store_output = [&](auto const& accO, Elem* so, int c) {
      Tensor sO = make_tensor(make_smem_ptr(so), typename Tr::LayoutO{});   // (C, BV)
      Tensor rO = make_tensor_like<Elem>(accO);
      CUTE_UNROLL
      for (int i = 0; i < size(accO); ++i) rO(i) = static_cast<Elem>(accO(i));
      copy(sts_o, sts_o_thr.retile_S(rO), sts_o_thr.partition_D(sO));
      __syncwarp();
      chunk::store_warp_rows<BV>(
          static_cast<Elem*>(p.o) + h * DV + tile * BV, H * DV,
          [&](int r, int col) { return so + typename Tr::PlainV{}(r, col); }, warp, lane, seg_begin + int64_t(c) * C,
          len, token);
    };

    load_first_chunks<S>(num_chunks, load_chunk);
    for (int c = 0; c < num_chunks; ++c) {
      const int stage = c % S, par = c & 1;   // loads by stage; gates, carries by parity
      cp_async_wait<S - 2>();
      bar_sync(kBarChunk, 2 * kWg);
      Tensor accS = partition_fragment_C(mma_qk, Shape<Int<C>, Int<C>>{});    // (MMA, 1, 1) Q K^T
      Tensor accO = partition_fragment_C(mma_qk, Shape<Int<C>, Int<BV>>{});   // (MMA, 1, 1) O
      Tensor accQc = partition_fragment_C(mma_qc, Shape<Int<C>, _8>{});       // (MMA, 1, 1) kDen: Q carry^T
      {
        Tensor sQ = make_tensor(make_smem_ptr(q_buf + stage * Tr::kQK), typename Tr::LayoutQK{});   // (C, DK)
        Tensor sK = make_tensor(make_smem_ptr(k_buf + stage * Tr::kQK), typename Tr::LayoutQK{});   // (C, DK)
        Tensor tSrQ = thr_qk.partition_fragment_A(sQ);                          // (MMA, 1, DK/16)
        Tensor tSrK = thr_qk.partition_fragment_B(sK);                          // (MMA, 1, DK/16)
        wgmma_issue(mma_qk, tSrQ, tSrK, accS, true);
        if constexpr (kDen) {   // <q, carry> in columns 0 (hi) and 1 (lo)
          Tensor sCt = make_tensor(make_smem_ptr(ct_buf + par * Tr::kCt), typename Tr::LayoutCt{});   // (8, DK)
          Tensor tQrQ = thr_qc.partition_fragment_A(sQ);                        // (MMA, 1, DK/16)
          Tensor tQrCt = thr_qc.partition_fragment_B(sCt);                      // (MMA, 1, DK/16)
          wgmma_issue(mma_qc, tQrQ, tQrCt, accQc, true);
        }
        // the inter-chunk term Q S (the state entering chunk c, in the input dtype): a group of its
        // own, running while the scores are masked
        Tensor sSt = make_tensor(make_smem_ptr(st_buf + par * Tr::kSt), typename Tr::LayoutSt{});   // (BV, DK)
        wgmma_issue(mma_qk, tSrQ, thr_qk.partition_fragment_B(sSt), accO, true);
      }
      load_chunk_ahead<S>(c, num_chunks, load_chunk);   // while the tensor cores work
      cp_async_fence();
      {
        const float* G = g_buf + par * C;
        Tensor sVt = make_tensor(make_smem_ptr(v_buf + stage * Tr::kV), typename Tr::LayoutVt{});   // (BV, C)
        warpgroup_wait<1>();   // Q K^T (and Q carry^T); Q S may still run
        fence_operand(accS);
        float q_carry[2];   // kDen: <q, carry> of rows r0, r0 + 8, from the quad's first lane
        if constexpr (kDen) {
          fence_operand(accQc);
          CUTE_UNROLL
          for (int h8 = 0; h8 < 2; ++h8)
            q_carry[h8] = __shfl_sync(0xffffffffu, accQc(2 * h8) + accQc(2 * h8 + 1), lane & ~3) / Tr::kCarryScale;
        }
        // P = S_qk * D * scale_intra, in the accumulator layout read as the A operand
        Tensor rP = make_tensor<Elem>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<C / 16>>,
                                             Stride<Stride<_1, _2, _4>, _0, _8>>{});   // (MMA, 1, C/16)
        float row_sum[2] = {0.f, 0.f};   // kDen: the rows' masked scores, for den
        auto put_p = [&](int i, float x) {
          rP(i) = static_cast<Elem>(x);
          if constexpr (kDen) row_sum[(i / 2) % 2] += x;
        };
        if constexpr (kNorm) {   // + w of the row (dq) or of the column (dk), before the mask
          const float* w = div_buf + stage * C;
          const float w_row[2] = {w[r0], w[r0 + 8]};
          const bool by_col = p.norm_by_col;
          decay_mask_scores(accS, G, r0, c0, p.scale_intra, put_p,
                            [&](int h8, int col) { return by_col ? w[col] : w_row[h8]; });
        } else {
          decay_mask_scores(accS, G, r0, c0, p.scale_intra, put_p);
        }
        // O = diag(exp(G)) Q S * scale_inter + P V: Q S's rows scaled in the accumulator, P V added
        // by the tensor cores
        warpgroup_wait<0>();
        fence_operand(accO);
        {
          const float w[2] = {exp2_ftz(G[r0]) * p.scale_inter, exp2_ftz(G[r0 + 8]) * p.scale_inter};
          chunk::scale_rows(accO, w);
        }
        Tensor tOrV = thr_pv.partition_fragment_B(sVt);                         // (MMA, 1, C/16)
        wgmma_issue(mma_pv, rP, tOrV, accO, false);
        float inv[2] = {1.f, 1.f};   // kDen: 1 / den of rows r0, r0 + 8
        if constexpr (kDen) {   // den = scale <q, carry> + the masked scores' row sum (+ 1e-10)
          chunk::sum_over_quad(row_sum);
          CUTE_UNROLL
          for (int h8 = 0; h8 < 2; ++h8) {
            const float den = row_sum[h8] + p.scale_inter * q_carry[h8] + 1e-10f;
            const int64_t pos = seg_begin + int64_t(c) * C + r0 + 8 * h8;
            if (tile == 0 && lane % 4 == 0 && pos < len) p.norm_den[token(pos) * H + h] = den;
            inv[h8] = 1.f / den;
          }
        }
        warpgroup_wait<0>();
        fence_operand(accO);
        if constexpr (kDen) chunk::scale_rows(accO, inv);
        if constexpr (kNorm) {   // + the carry, times w of the row (dq) or not (dk)
          const float* w = div_buf + stage * C;
          const float* carry = carry_buf + stage * BV;
          const float f[2] = {p.norm_by_col ? 1.f : w[r0], p.norm_by_col ? 1.f : w[r0 + 8]};
          CUTE_UNROLL
          for (int nb = 0; nb < BV / 8; ++nb) {
            const float2 cr = *reinterpret_cast<const float2*>(carry + c0 + 8 * nb);
            CUTE_UNROLL
            for (int h8 = 0; h8 < 2; ++h8) {
              accO(4 * nb + 2 * h8) += f[h8] * cr.x;
              accO(4 * nb + 2 * h8 + 1) += f[h8] * cr.y;
            }
          }
        }
        // Epilogue. Optional per-row dot products with another tensor (dg of the backward).
        if (p.dots != nullptr) {   // partner rows were prefetched with the chunk (zeros past the end)
          Tensor sD = make_tensor(make_smem_ptr(dot_buf + stage * Tr::kV), typename Tr::LayoutO{});   // (C, BV)
          auto lds_d = make_tiled_copy_C(typename Tr::LdsmAtom{}, mma_qk);
          auto lds_d_thr = lds_d.get_thread_slice(tid);
          Tensor rD = make_tensor_like<Elem>(accO);
          copy(lds_d, lds_d_thr.partition_S(sD), lds_d_thr.retile_D(rD));
          // values 2j, 2j + 1: one row (r0 + 8 (j % 2)), adjacent columns, one 32-bit register;
          // unpack_pair widens bf16 by a shift and a mask (the element-wise conversion took a
          // PRMT, an IMAD and a move per value: a quarter of the dots' instructions)
          Tensor rD32 = recast<uint32_t>(rD);
          CUTE_STATIC_ASSERT_V(size(rD32) * Int<2>{} == size(accO));
          float part[2] = {0.f, 0.f};
          CUTE_UNROLL
          for (int j = 0; j < size(rD32); ++j) {
            const float2 d = chunk::unpack_pair<Elem>(rD32(j));
            part[j % 2] = fmaf(accO(2 * j + 1), d.y, fmaf(accO(2 * j), d.x, part[j % 2]));
          }
          chunk::store_row_dots(p, part, lane, r0, seg_begin + int64_t(c) * C, len, tile, h, token);
        }
        if (!kDen && p.o_row_div != nullptr) chunk::divide_rows(accO, div_buf + stage * C, r0);
        store_output(accO, q_buf + stage * Tr::kQK, c);
      }
    }
  }
#else
  __trap();   // built without sm_90a: the host never launches this (chunk_pass_sm90_built)
#endif
}

}  // namespace chunk_sm90

template <typename Elem, int DK, int kFold>
void launch_chunk_pass_sm90(const ChunkParams& p, cudaStream_t stream) {
  using Tr = chunk_sm90::Traits<Elem, DK>;
  auto kernel = chunk_sm90::chunk_pass_sm90_kernel<Elem, DK, kFold>;
  const int smem = (p.dots != nullptr ? Tr::kBytesDots : Tr::kBytesNoDots) + Tr::kAlign;
  launch_with_smem(kernel, dim3(p.DV / Tr::BV, p.H, p.N * p.num_segs), Tr::kThreads, smem, Tr::kBytesDots + Tr::kAlign,
                   stream, p);
}

template <typename Elem, int DK>
void run_chunk_pass_sm90(const ChunkParams& p, cudaStream_t stream) {
  launch_chunk_pass_sm90<Elem, DK, chunk_sm90::kFoldNone>(p, stream);
}

template <typename Elem, int DK>
void run_chunk_pass_sm90_norm(const ChunkParams& p, cudaStream_t stream) {
  launch_chunk_pass_sm90<Elem, DK, chunk_sm90::kFoldGrad>(p, stream);
}

template <typename Elem, int DK>
void run_chunk_pass_sm90_den(const ChunkParams& p, cudaStream_t stream) {
  launch_chunk_pass_sm90<Elem, DK, chunk_sm90::kFoldDen>(p, stream);
}

template <typename Elem, int DK>
bool chunk_pass_sm90_built() {
  static const bool built = [] {
    cudaFuncAttributes attr{};
    // binaryVersion: the SM version of the code picked for the current device
    return cudaFuncGetAttributes(&attr, chunk_sm90::chunk_pass_sm90_kernel<Elem, DK>) == cudaSuccess &&
           attr.binaryVersion == 90;
  }();
  (void)cudaGetLastError();   // a failed query leaves no sticky error behind
  return built;
}

template <typename Elem, int DK>
int chunk_pass_sm90_blocks_per_sm(bool dots) {
  using Tr = chunk_sm90::Traits<Elem, DK>;
  return blocks_per_sm_with_smem(chunk_sm90::chunk_pass_sm90_kernel<Elem, DK>, Tr::kThreads,
                                 (dots ? Tr::kBytesDots : Tr::kBytesNoDots) + Tr::kAlign, Tr::kBytesDots + Tr::kAlign);
}

}  // namespace fla
