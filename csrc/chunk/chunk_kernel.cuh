// The chunk pass kernel (math in chunk.h). One thread block = one (value tile, head,
// sequence); 4 warps. Per chunk, with the chunk's q, k, v in shared memory:
//
//   S_qk = Q K^T                      (C, C)    warp w owns rows 16w..16w+15
//   P    = S_qk * D * scale_intra     registers, becomes the A operand of the next MMA
//   O    = diag(exp(G)) Q S * scale_inter + P V
//   S    = exp(G_last) S + K^T (V * exp(G_last - G))      (DK, BV), rows over warps
//
// All matmuls are SM80 m16n8k16 tensor-core MMAs (bf16/fp16 in, fp32 accumulate); the
// state S lives in fp32 registers and is copied to shared memory in the input dtype
// for the Q S product, as FLA does.
//
// Register fragments follow the m16n8 accumulator layout: value i of a thread sits at
// row r0 + 8 * ((i / 2) % 2) + 64 * m, column c0 + (i % 2) + 8 * n; element-wise work
// uses that structure (one gate per row and column, paired 32-bit shared stores) instead
// of per-element swizzled address arithmetic. The next chunk's q, k, v stream in
// with cp.async while the current one is computed (two stages).
#pragma once
#include <cute/tensor.hpp>

#include "chunk/chunk.h"
#include "chunk/chunk_walk.cuh"
#include "common/cuda_check.h"

namespace fla {
namespace chunk {

using namespace cute;

template <typename T> struct CuteType { using type = T; };
template <> struct CuteType<__nv_bfloat16> { using type = cute::bfloat16_t; };
template <> struct CuteType<__half> { using type = cute::half_t; };

// Shared-memory tiles: rows of 64 (or 32) elements, swizzled so that ldmatrix of 8 rows
// hits 8 different bank groups; 16-byte vectors stay contiguous.
template <int Cols>
CUTE_HOST_DEVICE constexpr auto smem_atom() {
  if constexpr (Cols % 64 == 0) {
    return composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{});
  } else {
    static_assert(Cols % 32 == 0);
    return composition(Swizzle<2, 3, 3>{}, Layout<Shape<_8, _32>, Stride<_32, _1>>{});
  }
}
template <int Rows, int Cols>
using SmemTile = decltype(tile_to_shape(smem_atom<Cols>(), Shape<Int<Rows>, Int<Cols>>{}));
// Element offset of (r, c) in a SmemTile<Rows, 64>, for per-element accesses at run-time
// coordinates: rows of 64 elements, the 16-byte groups XOR-ed with the row's low 3 bits.
// CuTe's layout arithmetic takes signed divisions there (7% of gla_bwd_intra's instructions).
CUTE_HOST_DEVICE constexpr int tile64_offset(int r, int c) { return r * 64 + (c ^ ((r & 7) << 3)); }
template <int Rows>
constexpr bool tile64_offset_matches() {
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < 64; ++c)
      if (SmemTile<Rows, 64>{}(r, c) != tile64_offset(r, c)) return false;
  return true;
}
static_assert(tile64_offset_matches<64>(), "tile64_offset is SmemTile<64, 64>'s layout");
// (Cols, Rows) view of a (Rows, Cols) tile: operands that must be read transposed.
template <int Rows, int Cols>
using SmemTileT = decltype(composition(SmemTile<Rows, Cols>{},
                                       make_layout(Shape<Int<Cols>, Int<Rows>>{}, GenRowMajor{})));

template <typename Elem_, int DK_, bool kGla_ = false>
struct Traits {
  using Elem = typename CuteType<Elem_>::type;
  static constexpr int C = kChunk;
  static constexpr int DK = DK_;
  static constexpr int BV = chunk_value_tile(DK_);
  static constexpr int kThreads = 128;
  using MmaOp = std::conditional_t<std::is_same_v<Elem, cute::bfloat16_t>, SM80_16x8x16_F32BF16BF16F32_TN,
                                   SM80_16x8x16_F32F16F16F32_TN>;
  // 4 warps stacked along M: a warp owns 16 rows of every product (64-row tiles).
  using TiledMma = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<_4, _1, _1>>, Tile<_64, _16, _16>>;
  using LdsmN = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;
  using LdsmT = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;

  using LayoutQK = SmemTile<C, DK>;     // q, k chunk            (C, DK)
  using LayoutKt = SmemTileT<C, DK>;    // k read as (DK, C)
  using LayoutV = SmemTile<C, BV>;      // v, scaled v           (C, BV)
  using LayoutVt = SmemTileT<C, BV>;    // read as (BV, C)
  using LayoutH = SmemTile<DK, BV>;     // state, input dtype    (DK, BV)
  using LayoutHt = SmemTileT<DK, BV>;   // read as (BV, DK)
  using LayoutA = SmemTile<C, C>;       // GLA: precomputed scores (C, C)
  using LayoutAt = SmemTileT<C, C>;     // read transposed

  static constexpr int kQK = C * DK, kV = C * BV, kHt = BV * DK;
  // two stages of q, k, v; scaled v; state^T; then two stages of cumulative gates
  static constexpr int kElems = 2 * (2 * kQK + kV) + kV + kHt + 2 * kV;   // ... + dot partner stages
  static constexpr int kSmemBytes = kElems * int(sizeof(Elem)) + 2 * C * int(sizeof(float)) +
                                    (kGla_ ? 2 * C * C * int(sizeof(Elem)) : 0);   // + GLA score stages
};

// acc (C fragment, ((2,2), M, N)) -> A operand ((2,2,2), M, N/2): two n8 accumulator
// blocks are one k16 block of the next product (the register layouts coincide).
template <class L>
CUTE_HOST_DEVICE auto acc_as_operand_a(L acc) {
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});   // ((2,2), M, (2, N/2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// acc += A B^T with A (M, K) and B (N, K) both in shared memory; only the k16 blocks
// [kb_lo, kb_hi) when given (bounds uniform within a warp: each warp may pass its own).
template <class Tr, class TA, class TB, class Acc, class CopyA, class CopyB>
__device__ __forceinline__ void gemm_ss(Acc& acc, TA const& sA, TB const& sB, CopyA, CopyB, int tid,
                                        int kb_lo = 0, int kb_hi = 1 << 30) {
  typename Tr::TiledMma mma;
  auto thr = mma.get_slice(tid);
  Tensor tCrA = thr.partition_fragment_A(sA);                 // (MMA, MMA_M, MMA_K)
  Tensor tCrB = thr.partition_fragment_B(sB);                 // (MMA, MMA_N, MMA_K)
  auto copy_a = make_tiled_copy_A(CopyA{}, mma);
  auto copy_b = make_tiled_copy_B(CopyB{}, mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor tCsA = thr_a.partition_S(sA);
  Tensor tCsB = thr_b.partition_S(sB);
  Tensor tCrA_v = thr_a.retile_D(tCrA);
  Tensor tCrB_v = thr_b.retile_D(tCrB);
  CUTE_STATIC_ASSERT_V(size<1>(tCrA) == size<1>(acc));        // MMA_M
  CUTE_STATIC_ASSERT_V(size<1>(tCrB) == size<2>(acc));        // MMA_N
  CUTE_STATIC_ASSERT_V(size<2>(tCrA) == size<2>(tCrB));       // MMA_K
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(tCrA); ++kb) {
    if (kb < kb_lo || kb >= kb_hi) continue;
    copy(copy_a, tCsA(_, _, kb), tCrA_v(_, _, kb));
    copy(copy_b, tCsB(_, _, kb), tCrB_v(_, _, kb));
    gemm(mma, tCrA(_, _, kb), tCrB(_, _, kb), acc);
  }
}

// acc += A B^T with A already in registers (as an A operand) and B (N, K) in shared memory;
// only the k16 blocks below kb_hi when given (uniform within a warp).
template <class Tr, class RA, class TB, class Acc, class CopyB>
__device__ __forceinline__ void gemm_rs(Acc& acc, RA const& tCrA, TB const& sB, CopyB, int tid, int kb_hi = 1 << 30) {
  typename Tr::TiledMma mma;
  auto thr = mma.get_slice(tid);
  Tensor tCrB = thr.partition_fragment_B(sB);                 // (MMA, MMA_N, MMA_K)
  auto copy_b = make_tiled_copy_B(CopyB{}, mma);
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor tCsB = thr_b.partition_S(sB);
  Tensor tCrB_v = thr_b.retile_D(tCrB);
  CUTE_STATIC_ASSERT_V(size<1>(tCrB) == size<2>(acc));
  CUTE_STATIC_ASSERT_V(size<2>(tCrA) == size<2>(tCrB));
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(tCrA); ++kb) {
    if (kb >= kb_hi) continue;
    copy(copy_b, tCsB(_, _, kb), tCrB_v(_, _, kb));
    gemm(mma, tCrA(_, _, kb), tCrB(_, _, kb), acc);
  }
}

// Two floats as a pair of Elem in one register (one cvt.rn.bf16x2 / f16x2 instead of two
// scalar conversions), and back.
template <typename Elem>
__device__ __forceinline__ uint32_t pack_pair(float a, float b) {
  if constexpr (std::is_same_v<Elem, cute::bfloat16_t>) {
    const __nv_bfloat162 x = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&x);
  } else {
    const __half2 x = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&x);
  }
}
template <typename Elem>
__device__ __forceinline__ float2 unpack_pair(uint32_t x) {
  if constexpr (std::is_same_v<Elem, cute::bfloat16_t>) {
    return make_float2(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&x));
  }
}

// Accumulator -> shared memory in the input dtype: values 2j, 2j+1 are adjacent columns
// (contiguous in every tile layout here), so each pair is one 32-bit store.
template <class Acc, class Dst>
__device__ __forceinline__ void store_pairs(Acc const& acc, Dst& dst) {
  using Elem = typename Dst::value_type;
  CUTE_STATIC_ASSERT_V(size(acc) == size(dst));
  CUTE_UNROLL
  for (int i = 0; i < size(acc); i += 2) *reinterpret_cast<uint32_t*>(&dst(i)) = pack_pair<Elem>(acc(i), acc(i + 1));
}

template <typename Elem_, int DK, bool kGla>
__global__ void __launch_bounds__(128) chunk_pass_kernel(const __grid_constant__ ChunkParams p) {
  using Tr = Traits<Elem_, DK, kGla>;
  using Elem = typename Tr::Elem;
  constexpr int C = Tr::C, BV = Tr::BV, kThreads = Tr::kThreads;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Elem* smem = reinterpret_cast<Elem*>(smem_raw);
  Elem* const q_buf = smem;                       // [2][C*DK]
  Elem* const k_buf = q_buf + 2 * Tr::kQK;        // [2][C*DK]
  Elem* const v_buf = k_buf + 2 * Tr::kQK;        // [2][C*BV]
  Elem* const vs_buf = v_buf + 2 * Tr::kV;        // [C*BV]  v * exp(G_last - G)
  Elem* const ht_buf = vs_buf + Tr::kV;           // [BV*DK]
  Elem* const dot_buf = ht_buf + Tr::kHt;         // [2][C*BV] rows of dot_with
  float* const g_buf = reinterpret_cast<float*>(dot_buf + 2 * Tr::kV);   // [2][C] cumulative gates
  Elem* const a_buf = reinterpret_cast<Elem*>(g_buf + 2 * C);             // GLA: [2][C*C] scores

  const int tile = blockIdx.x, h = blockIdx.y, n = blockIdx.z / p.num_segs, seg = blockIdx.z % p.num_segs;
  // GLA reverse: chunks walked last to first in time order (chunk.h); the scalar pass flips
  // positions instead
  const bool chunks_reversed = kGla && p.reverse, flip = !kGla && p.reverse;
  const int final_seg = chunks_reversed ? 0 : p.num_segs - 1;   // the segment walked last
  if (p.state_only && seg == final_seg) return;   // nobody starts after the last segment
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t H = p.H, DV = p.DV;
  const WalkSpan span = walk_span(p, n, seg);
  const int64_t bos = span.bos, len = span.len, seg_begin = span.seg_begin;
  const int num_chunks = span.num_chunks;
  const bool last_seg = seg == final_seg;
  // token (row of the [B*T, H, D] inputs) at processing position pos
  auto token = [&](int64_t pos) { return bos + (flip ? len - 1 - pos : pos); };
  // the chunk (in time order within the segment) walked c-th
  auto time_chunk = [&](int c) { return chunks_reversed ? num_chunks - 1 - c : c; };

  const Elem* q = static_cast<const Elem*>(p.q) + h * DK;
  const Elem* k = static_cast<const Elem*>(p.k) + h * DK;
  const Elem* v = static_cast<const Elem*>(p.v) + h * DV + tile * BV;

  // Loads: thread tid moves 16-byte vectors at rows r0 + j * kRowsQK (kRowsV) of a chunk;
  // shared offsets are fixed for the whole walk, global ones step by a row stride.
  constexpr int kVecQK = DK / 8, kRowsQK = kThreads / kVecQK, kVecV = BV / 8, kRowsV = kThreads / kVecV;
  static_assert(kThreads % kVecQK == 0 && kThreads % kVecV == 0, "vector rows must tile the block");
  const int rq0 = tid / kVecQK, cq = tid % kVecQK * 8, rv0 = tid / kVecV, cv = tid % kVecV * 8;
  int smem_off_qk[C / kRowsQK], smem_off_v[C / kRowsV];
  CUTE_UNROLL
  for (int j = 0; j < C / kRowsQK; ++j) smem_off_qk[j] = typename Tr::LayoutQK{}(rq0 + j * kRowsQK, cq);
  CUTE_UNROLL
  for (int j = 0; j < C / kRowsV; ++j) smem_off_v[j] = typename Tr::LayoutV{}(rv0 + j * kRowsV, cv);
  const Elem* other = static_cast<const Elem*>(p.dot_with) + h * DV + tile * BV;
  // GLA score tiles (A, A_lo): C elements a row
  constexpr int kVecA = C / 8, kRowsA = kThreads / kVecA;
  const int ra0 = tid / kVecA, ca = tid % kVecA * 8;
  int smem_off_a[kGla ? C / kRowsA : 1];
  if constexpr (kGla) {
    CUTE_UNROLL
    for (int j = 0; j < C / kRowsA; ++j) smem_off_a[j] = typename Tr::LayoutA{}(ra0 + j * kRowsA, ca);
  }
  // GLA: the chunk's slot is its segment's first slot plus its chunk index in the segment
  // (the first slot is read once: chunk_offsets is a global load in front of the decay copy)
  const int64_t seg_slot0 = kGla ? walk_first_slot(p, n, seg_begin) : 0;
  auto slot_of = [&](int c) { return seg_slot0 + time_chunk(c); };
  // GLA: one decay per key row, or per state column (decay_cols: tile columns of DV)
  const int64_t decay_dim = kGla && p.decay_cols ? DV : DK;
  // GLA: the chunk's decays, staged with its inputs (vs_buf is free in GLA mode): read from
  // global memory at their use, they stalled the walk on the load (11-12% of its samples)
  float* const decay_buf = reinterpret_cast<float*>(vs_buf);   // [2][DK]
  // o_row_div: a chunk's divisors, staged with its inputs in the dots partner stages (a pass
  // with o_row_div has no dots)
  float* const row_div_buf = reinterpret_cast<float*>(dot_buf);   // [2][C]
  static_assert(2 * C * 4 <= 2 * Tr::kV * int(sizeof(Elem)), "the divisor stages fit the dots partner stages");
  static_assert(!kGla || 2 * DK * 4 <= Tr::kV * int(sizeof(Elem)), "the decay stages fit vs_buf");
  auto load_chunk = [&](int c, int stage) {
    const int64_t pos0 = seg_begin + int64_t(time_chunk(c)) * C;
    const int rows_left = int(min(int64_t(C), len - pos0));
    const int64_t qk_off = token(pos0 + rq0) * H * DK + cq, qk_step = (flip ? -kRowsQK : kRowsQK) * H * DK;
    if (!p.state_only)   // the state needs k, v only
      copy_chunk_rows<kRowsQK>(q_buf + stage * Tr::kQK, smem_off_qk, q, qk_off, qk_step, rq0, rows_left);
    copy_chunk_rows<kRowsQK>(k_buf + stage * Tr::kQK, smem_off_qk, k, qk_off, qk_step, rq0, rows_left);
    const int64_t v_off = token(pos0 + rv0) * H * DV + cv, v_step = (flip ? -kRowsV : kRowsV) * H * DV;
    copy_chunk_rows<kRowsV>(v_buf + stage * Tr::kV, smem_off_v, v, v_off, v_step, rv0, rows_left);
    if (p.dots != nullptr)   // the dot partner has v's layout
      copy_chunk_rows<kRowsV>(dot_buf + stage * Tr::kV, smem_off_v, other, v_off, v_step, rv0, rows_left);
    if (!kGla && p.o_row_div != nullptr && !p.state_only && tid < C) {   // the output rows' divisors (zeros past the end)
      const bool valid = tid < rows_left;
      cp_async_4(row_div_buf + stage * C + tid, p.o_row_div + (valid ? token(pos0 + tid) * H + h : 0), valid);
    }
    if constexpr (kGla) {
      if (!p.state_only && p.A != nullptr)
        copy_chunk_rows<kRowsA>(a_buf + stage * C * C, smem_off_a, static_cast<const Elem*>(p.A) + h * C,
                  token(pos0 + ra0) * H * C + ca, int64_t(kRowsA) * H * C, ra0, rows_left);
      // per key row, or the tile's columns (decay_cols); 16-byte vectors
      const float* decay = p.key_decay + (slot_of(c) * H + h) * decay_dim + (p.decay_cols ? tile * BV : 0);
      if (tid < (p.decay_cols ? BV : DK) / 4) cp_async_16(decay_buf + stage * DK + 4 * tid, decay + 4 * tid, true);
    }
  };
  // GLA A_lo: one stage in the dots partner buffer (unused in GLA mode), loaded after the
  // previous chunk's products (the barrier before the state update) and waited for with the
  // next chunk.
  static_assert(!kGla || 2 * Tr::kV >= C * C, "A_lo fits the dots partner stages");
  Elem* const alo_buf = dot_buf;
  auto load_alo = [&](int c) {
    const int64_t pos0 = seg_begin + int64_t(time_chunk(c)) * C;
    copy_chunk_rows<kRowsA>(alo_buf, smem_off_a, static_cast<const Elem*>(p.A_lo) + h * C,
              token(pos0 + ra0) * H * C + ca, int64_t(kRowsA) * H * C, ra0, int(min(int64_t(C), len - pos0)));
  };
  // Warp 0 fetches a chunk's raw gates early and scans them late (latency hidden).
  float raw_gate0 = 0.f, raw_gate1 = 0.f;
  auto fetch_gates = [&](int c) { fetch_gate_pair(p, h, span, c, lane, raw_gate0, raw_gate1); };
  auto scan_gates = [&](int stage) { scan_gate_pairs(raw_gate0, raw_gate1, lane, g_buf + stage * C); };

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);

  // The state tile S (DK, BV) in fp32 registers.
  Tensor accH = partition_fragment_C(mma, Shape<Int<DK>, Int<BV>>{});     // (MMA, MMA_M, MMA_N)
  Tensor tHcH = thr_mma.partition_C(make_identity_tensor(Shape<Int<DK>, Int<BV>>{}));
  CUTE_STATIC_ASSERT_V(size(accH) == size(tHcH));
  const int64_t state_off = (int64_t(n) * H + h) * DK * DV + int64_t(tile) * BV * p.state_stride_v;
  if (p.h0 != nullptr && !p.state_only) {
    CUTE_UNROLL
    for (int i = 0; i < size(accH); ++i)
      accH(i) = p.h0[state_off + get<0>(tHcH(i)) * p.state_stride_k + get<1>(tHcH(i)) * p.state_stride_v];
  } else {
    clear(accH);
  }
  // segment s > 0 of a split walk: fold in the segments before it, in order
  auto seg_state_off = [&](int s) { return ((int64_t(n) * p.num_segs + s) * H + h) * DK * DV + int64_t(tile) * BV; };
  const int walked_before = chunks_reversed ? p.num_segs - 1 - seg : seg;
  if (!p.state_only && walked_before > 0) {
    for (int i_s = 0; i_s < walked_before; ++i_s) {
      const int s = chunks_reversed ? p.num_segs - 1 - i_s : i_s;
      const float* u = p.seg_states + seg_state_off(s);
      if constexpr (kGla) {   // per key row (column): the product of the segment's chunk decays
        const float* a = p.seg_gates + ((int64_t(n) * p.num_segs + s) * H + h) * decay_dim;
        CUTE_UNROLL
        for (int i = 0; i < size(accH); ++i)
          accH(i) = a[p.decay_cols ? tile * BV + get<1>(tHcH(i)) : get<0>(tHcH(i))] * accH(i) +
                    u[get<0>(tHcH(i)) * DV + get<1>(tHcH(i))];
      } else {
        const float a = exp2_ftz(p.seg_gates[(int64_t(n) * p.num_segs + s) * H + h]);
        CUTE_UNROLL
        for (int i = 0; i < size(accH); ++i) accH(i) = a * accH(i) + u[get<0>(tHcH(i)) * DV + get<1>(tHcH(i))];
      }
    }
  }
  float gate_sum = 0.f;   // total log2 gate of this block's positions (state-only launch)
  // GLA: per key row, the product of the chunk decays of this block's positions (state-only
  // launch). m16n8 accumulators: values 0, 1 of an MMA sit on one row, 2, 3 eight rows below.
  constexpr int kStateM = DK / 64, kStateN = BV / 8;   // MMA_M, MMA_N of the state tile
  CUTE_STATIC_ASSERT_V(size<1>(accH) == Int<kStateM>{});
  CUTE_STATIC_ASSERT_V(size<2>(accH) == Int<kStateN>{});
  float decay_prod[kStateM][2];
  CUTE_UNROLL
  for (int m = 0; m < kStateM; ++m) decay_prod[m][0] = decay_prod[m][1] = 1.f;
  Tensor sH = make_tensor(make_smem_ptr(ht_buf), typename Tr::LayoutH{});   // (DK, BV)
  Tensor tHsH = thr_mma.partition_C(sH);
  auto store_state_smem = [&] { store_pairs(accH, tHsH); };

  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));    // coords of S_qk
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<C>, Int<BV>>{}));   // coords of O

  // O goes out through this warp's own rows of the q tile (no longer read): 16-byte stores.
  auto store_output = [&](auto const& accO, auto& sQ, int c) {
    __syncwarp();
    Tensor tOsQ = thr_mma.partition_C(local_tile(sQ, Shape<Int<C>, Int<BV>>{}, make_coord(0, 0)));
    CUTE_STATIC_ASSERT_V(size(tOsQ) == size(accO));
    store_pairs(accO, tOsQ);
    __syncwarp();
    store_warp_rows<BV>(
        static_cast<Elem*>(p.o) + h * DV + tile * BV, H * DV, [&](int r, int col) { return &sQ(r, col); }, warp, lane,
        seg_begin + int64_t(c) * C, len, token);
  };

  // GLA state_dots: per column of the state, sum over rows of states_in[slot] * S. Each warp's
  // column sums go to red_buf[c & 1][warp] (the dots partner stages, unused in GLA mode); the
  // next chunk's barrier makes them visible and BV threads add the four warps up.
  float* const red_buf = reinterpret_cast<float*>(dot_buf);   // [2][4][BV]
  int64_t pending_slot = 0;
  auto flush_state_dot = [&](int c) {
    if (tid < BV) {
      const float* r = red_buf + (c & 1) * 4 * BV;
      p.state_dots[(pending_slot * H + h) * DV + tile * BV + tid] = (r[tid] + r[BV + tid]) + (r[2 * BV + tid] + r[3 * BV + tid]);
    }
  };
  auto state_dot = [&](int64_t slot, int c) {
    if (c > 0) flush_state_dot(c - 1);   // chunk c - 1's sums, visible since this chunk's barrier
    const float* hin = static_cast<const float*>(p.states_in) + (slot * H + h) * DK * DV + tile * BV;
    float part[kStateN][2];
    CUTE_UNROLL
    for (int nn = 0; nn < kStateN; ++nn) part[nn][0] = part[nn][1] = 0.f;
    CUTE_UNROLL
    for (int m = 0; m < kStateM; ++m)
      CUTE_UNROLL
      for (int nn = 0; nn < kStateN; ++nn)
        CUTE_UNROLL
        for (int v = 0; v < size<0>(accH); v += 2) {
          const float2 x = *reinterpret_cast<const float2*>(hin + get<0>(tHcH(v, m, nn)) * DV + get<1>(tHcH(v, m, nn)));
          part[nn][0] += x.x * accH(v, m, nn);
          part[nn][1] += x.y * accH(v + 1, m, nn);
        }
    CUTE_UNROLL
    for (int nn = 0; nn < kStateN; ++nn)
      CUTE_UNROLL
      for (int e = 0; e < 2; ++e) {   // lanes with one lane % 4 hold one column
        part[nn][e] += __shfl_xor_sync(0xffffffffu, part[nn][e], 4);
        part[nn][e] += __shfl_xor_sync(0xffffffffu, part[nn][e], 8);
        part[nn][e] += __shfl_xor_sync(0xffffffffu, part[nn][e], 16);
      }
    if (lane < 4) {
      CUTE_UNROLL
      for (int nn = 0; nn < kStateN; ++nn)
        CUTE_UNROLL
        for (int e = 0; e < 2; ++e) red_buf[((c & 1) * 4 + warp) * BV + get<1>(tHcH(e, 0, nn))] = part[nn][e];
    }
    pending_slot = slot;
  };

  if (num_chunks > 0) {
    load_chunk(0, 0);
    if (kGla && p.A_lo != nullptr && !p.state_only) load_alo(0);
    cp_async_fence();
    if (!kGla && warp == 0) {
      fetch_gates(0);
      scan_gates(0);
    }
  }
  store_state_smem();

  for (int c = 0; c < num_chunks; ++c) {
    const int stage = c & 1;
    cp_async_wait<0>();
    __syncthreads();                     // chunk c, its gates and the state copy are visible
    if (c + 1 < num_chunks) {
      load_chunk(c + 1, stage ^ 1);
      if (!kGla && warp == 0) fetch_gates(c + 1);
    }
    cp_async_fence();

    Tensor sQ = make_tensor(make_smem_ptr(q_buf + stage * Tr::kQK), typename Tr::LayoutQK{});   // (C, DK)
    Tensor sK = make_tensor(make_smem_ptr(k_buf + stage * Tr::kQK), typename Tr::LayoutQK{});   // (C, DK)
    Tensor sKt = make_tensor(make_smem_ptr(k_buf + stage * Tr::kQK), typename Tr::LayoutKt{});  // (DK, C)
    Tensor sVt = make_tensor(make_smem_ptr(v_buf + stage * Tr::kV), typename Tr::LayoutVt{});   // (BV, C)
    Tensor sVst = make_tensor(make_smem_ptr(vs_buf), typename Tr::LayoutVt{});                  // (BV, C)
    Tensor sHt = make_tensor(make_smem_ptr(ht_buf), typename Tr::LayoutHt{});                   // (BV, DK) view
    if constexpr (kGla) {
      // One barrier interval holds both products of the chunk: O from the state copy S_c in
      // shared memory, and S_{c+1} in registers (its K~^T V product interleaves with Q~ S_c).
      // The copy of S_{c+1} is written after the barrier that ends every warp's reads of S_c.
      const int64_t slot = slot_of(c);
      // the chunk's decays exp(G_last) of the state rows this thread holds (decay_cols: of its
      // state columns)
      const float* decay = decay_buf + stage * DK;
      float key_decay[kStateM][2], col_decay[kStateN][2];
      if (p.decay_cols) {
        CUTE_UNROLL
        for (int nn = 0; nn < kStateN; ++nn)
          CUTE_UNROLL
          for (int e = 0; e < 2; ++e) col_decay[nn][e] = decay[get<1>(tHcH(e, 0, nn))];
      } else {
        CUTE_UNROLL
        for (int m = 0; m < kStateM; ++m) {
          key_decay[m][0] = decay[get<0>(tHcH(0, m, 0))];
          key_decay[m][1] = decay[get<0>(tHcH(2, m, 0))];
        }
      }
      if (!p.state_only) {
        if (p.state_dots != nullptr) state_dot(slot, c);
        if (p.states_out != nullptr) {   // the state entering chunk `slot`
          float* out = static_cast<float*>(p.states_out) + (slot * H + h) * DK * DV + tile * BV;
          CUTE_UNROLL
          for (int i = 0; i < size(accH); i += 2)
            *reinterpret_cast<float2*>(out + get<0>(tHcH(i)) * DV + get<1>(tHcH(i))) = make_float2(accH(i), accH(i + 1));
        }
      } else if (!p.decay_cols) {
        CUTE_UNROLL
        for (int m = 0; m < kStateM; ++m) {
          decay_prod[m][0] *= key_decay[m][0];
          decay_prod[m][1] *= key_decay[m][1];
        }
      }
      // S_{c+1} = diag(exp(G_last)) S_c + K~^T V; scale_update != 1 (backward):
      // su * (decay S_c / su + K~^T V)
      const bool scaled = p.scale_update != 1.f;
      const float inv = scaled ? 1.f / p.scale_update : 1.f;
      if (p.decay_cols) {
        CUTE_UNROLL
        for (int nn = 0; nn < kStateN; ++nn)
          CUTE_UNROLL
          for (int v = 0; v < size<0>(accH); ++v) {
            const float f = col_decay[nn][v % 2] * inv;
            CUTE_UNROLL
            for (int m = 0; m < kStateM; ++m) accH(v, m, nn) *= f;
          }
      } else {
        CUTE_UNROLL
        for (int m = 0; m < kStateM; ++m)
          CUTE_UNROLL
          for (int v = 0; v < size<0>(accH); ++v) {
            const float f = key_decay[m][v / 2] * inv;
            CUTE_UNROLL
            for (int nn = 0; nn < kStateN; ++nn) accH(v, m, nn) *= f;
          }
      }
      if (!p.state_only) {
        // O = Q~ S * scale_inter + A V, with q~ = q exp(G) and the scores A made by gla_intra
        // (backward: A^T when the chunks are walked in reverse, no A for the inter-chunk terms)
        Tensor sA = make_tensor(make_smem_ptr(a_buf + stage * C * C), typename Tr::LayoutA{});   // (C, C)
        Tensor sAt = make_tensor(make_smem_ptr(a_buf + stage * C * C), typename Tr::LayoutAt{}); // (C, C) A^T
        Tensor accO = partition_fragment_C(mma, Shape<Int<C>, Int<BV>>{});     // (MMA, MMA_M, MMA_N)
        clear(accO);
        gemm_ss<Tr>(accO, sQ, sHt, typename Tr::LdsmN{}, typename Tr::LdsmT{}, tid);
        gemm_ss<Tr>(accH, sKt, sVt, typename Tr::LdsmT{}, typename Tr::LdsmT{}, tid);
        CUTE_UNROLL
        for (int i = 0; i < size(accO); ++i) accO(i) *= p.scale_inter;
        // A is zero above its diagonal: the warp's rows need key blocks 0..warp of A, and
        // warp..3 of A^T
        if (p.A != nullptr) {
          if (chunks_reversed)
            gemm_ss<Tr>(accO, sAt, sVt, typename Tr::LdsmT{}, typename Tr::LdsmT{}, tid, warp);
          else
            gemm_ss<Tr>(accO, sA, sVt, typename Tr::LdsmN{}, typename Tr::LdsmT{}, tid, 0, warp + 1);
        }
        if (p.A_lo != nullptr) {
          Tensor sL = make_tensor(make_smem_ptr(alo_buf), typename Tr::LayoutA{});     // (C, C)
          Tensor sLt = make_tensor(make_smem_ptr(alo_buf), typename Tr::LayoutAt{});   // (C, C) transposed
          if (chunks_reversed)
            gemm_ss<Tr>(accO, sLt, sVt, typename Tr::LdsmT{}, typename Tr::LdsmT{}, tid, warp);
          else
            gemm_ss<Tr>(accO, sL, sVt, typename Tr::LdsmN{}, typename Tr::LdsmT{}, tid, 0, warp + 1);
        }
        if (p.o_fp32) {
          float* o = static_cast<float*>(p.o) + h * DV + tile * BV;
          CUTE_UNROLL
          for (int i = 0; i < size(accO); i += 2) {
            const int64_t pos = seg_begin + int64_t(time_chunk(c)) * C + get<0>(tOcO(i));
            if (pos < len)
              *reinterpret_cast<float2*>(o + token(pos) * H * DV + get<1>(tOcO(i))) = make_float2(accO(i), accO(i + 1));
          }
        } else {
          store_output(accO, sQ, time_chunk(c));
        }
      } else {
        gemm_ss<Tr>(accH, sKt, sVt, typename Tr::LdsmT{}, typename Tr::LdsmT{}, tid);
      }
      if (scaled) {
        CUTE_UNROLL
        for (int i = 0; i < size(accH); ++i) accH(i) *= p.scale_update;
      }
      __syncthreads();                   // every warp is done with the state copy (and A_lo)
      if (p.A_lo != nullptr && !p.state_only && c + 1 < num_chunks) {
        load_alo(c + 1);
        cp_async_fence();
      }
      store_state_smem();
      continue;
    }
    const float* G = g_buf + stage * C;
    const float g_last = G[C - 1];
    gate_sum += g_last;

    // V scaled by its decay to the chunk end, for the state update (read after the next barrier).
    scale_rows_to_chunk_end<kRowsV>(v_buf + stage * Tr::kV, vs_buf, smem_off_v, G, rv0, p.scale_update);

    if (!p.state_only) {
    // P = (Q K^T) * D * scale_intra
      Tensor accS = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});      // (MMA, MMA_M, MMA_N)
      clear(accS);
      gemm_ss<Tr>(accS, sQ, sK, typename Tr::LdsmN{}, typename Tr::LdsmN{}, tid);
      decay_mask_scores(accS, G, get<0>(tScS(0)), get<1>(tScS(0)), p.scale_intra,
                        [&](int i, float x) { accS(i) = x; });
      Tensor rP = make_tensor_like<Elem>(accS);
      CUTE_UNROLL
      for (int i = 0; i < size(accS); ++i) rP(i) = static_cast<Elem>(accS(i));
      Tensor tOrP = make_tensor(rP.data(), acc_as_operand_a(rP.layout()));   // (MMA, MMA_M, C/16)
  
      // O = diag(exp(G)) Q S * scale_inter + P V
      Tensor accO = partition_fragment_C(mma, Shape<Int<C>, Int<BV>>{});     // (MMA, MMA_M, MMA_N)
      clear(accO);
      gemm_ss<Tr>(accO, sQ, sHt, typename Tr::LdsmN{}, typename Tr::LdsmT{}, tid);
      {
        const int r0 = get<0>(tOcO(0));
        const float w[2] = {exp2_ftz(G[r0]) * p.scale_inter, exp2_ftz(G[r0 + 8]) * p.scale_inter};
        scale_rows(accO, w);
      }
      // P is zero past the warp's diagonal block: its key blocks 0..warp only
      gemm_rs<Tr>(accO, tOrP, sVt, typename Tr::LdsmT{}, tid, warp + 1);
  
      // Epilogue. Optional per-row dot products with another tensor (dg of the backward).
      if (p.dots != nullptr) {   // partner rows were prefetched with the chunk (zeros past the end)
        Tensor sD = make_tensor(make_smem_ptr(dot_buf + stage * Tr::kV), typename Tr::LayoutV{});  // (C, BV)
        Tensor tOsD = thr_mma.partition_C(sD);
        float part[2] = {0.f, 0.f};
        CUTE_UNROLL
        for (int i = 0; i < size(accO); i += 2) {
          cute::array<Elem, 2> x;
          *reinterpret_cast<uint32_t*>(x.data()) = *reinterpret_cast<const uint32_t*>(&tOsD(i));
          part[(i / 2) % 2] += accO(i) * static_cast<float>(x[0]) + accO(i + 1) * static_cast<float>(x[1]);
        }
        store_row_dots(p, part, lane, warp * 16 + lane / 4, seg_begin + int64_t(c) * C, len, tile, h, token);
      }
      if (p.o_row_div != nullptr) divide_rows(accO, row_div_buf + stage * C, get<0>(tOcO(0)));
      store_output(accO, sQ, c);
    }
    __syncthreads();                     // scaled v written; every warp is done with the state copy
    // S = exp(G_last) S + K^T Vs
    const float a = exp2_ftz(g_last);
    CUTE_UNROLL
    for (int i = 0; i < size(accH); ++i) accH(i) *= a;
    gemm_ss<Tr>(accH, sKt, sVst, typename Tr::LdsmT{}, typename Tr::LdsmT{}, tid);
    store_state_smem();
    if (warp == 0 && c + 1 < num_chunks) scan_gates(stage ^ 1);
  }
  if (kGla && p.state_dots != nullptr && !p.state_only && num_chunks > 0) {   // the last chunk's column sums
    __syncthreads();
    flush_state_dot(num_chunks - 1);
  }

  if (p.state_only) {
    float* u = p.seg_states + seg_state_off(seg);
    CUTE_UNROLL
    for (int i = 0; i < size(accH); ++i) u[get<0>(tHcH(i)) * DV + get<1>(tHcH(i))] = accH(i);
    if constexpr (kGla) {
      if (p.decay_cols) {   // per column: the product over the segment's chunks, from key_decay
        float* a = p.seg_gates + ((int64_t(n) * p.num_segs + seg) * H + h) * DV + tile * BV;
        for (int col = tid; col < BV; col += kThreads) {
          float prod = 1.f;
          for (int cc = 0; cc < num_chunks; ++cc) prod *= p.key_decay[((seg_slot0 + cc) * H + h) * DV + tile * BV + col];
          a[col] = prod;
        }
      } else if (tile == 0 && lane % 4 == 0) {   // the first lane of each quad holds distinct rows
        float* a = p.seg_gates + ((int64_t(n) * p.num_segs + seg) * H + h) * DK;
        CUTE_UNROLL
        for (int m = 0; m < kStateM; ++m) {
          a[get<0>(tHcH(0, m, 0))] = decay_prod[m][0];
          a[get<0>(tHcH(2, m, 0))] = decay_prod[m][1];
        }
      }
    } else {
      if (tile == 0 && tid == 0) p.seg_gates[(int64_t(n) * p.num_segs + seg) * H + h] = gate_sum;
    }
    return;
  }
  if (p.ht != nullptr && last_seg) {
    // reverse: the first step's gate still applies (dL/dS_{-1} = exp(g_0) dL/dS_0)
    const float a = (flip && len > 0) ? __expf(fmaxf(raw_gate_at_token(p, h, bos), kMinLogGate)) : 1.f;
    CUTE_UNROLL
    for (int i = 0; i < size(accH); ++i)
      p.ht[state_off + get<0>(tHcH(i)) * p.state_stride_k + get<1>(tHcH(i)) * p.state_stride_v] = accH(i) * a;
  }
}

}  // namespace chunk

template <typename Elem, int DK, bool kGla>
void run_chunk_pass(const ChunkParams& p, cudaStream_t stream) {
  using Tr = chunk::Traits<Elem, DK, kGla>;
  auto kernel = chunk::chunk_pass_kernel<Elem, DK, kGla>;
  FLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
  const dim3 grid(p.DV / Tr::BV, p.H, p.N * p.num_segs);
  if (grid.x * grid.y * grid.z == 0) return;
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  FLA_CHECK_LAUNCH();
}

}  // namespace fla
