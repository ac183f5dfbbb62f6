// The GLA mode of the chunk pass (chunk.h: q~ and k~ arrive gated, the intra-chunk scores A
// are read instead of computed, the state decays per key row, or per state column with
// decay_cols) on Hopper wgmma, with the two-warpgroup layout of chunk_pass_sm90.cuh:
//
//   state warpgroup: S^T (BV, DK) fp32 in registers;
//       S^T <- diag-decay(S^T) / su, S^T += V^T K~ (wgmma), S^T *= su     (su = scale_update)
//     states_out / state_dots (the state entering each chunk, backward), X = Q~ S * scale_inter
//     handed to the output warpgroup, the loads of q~, k~, v and the chunk's decays;
//   output warpgroup: O = A V (+ A_lo V) as a wgmma with A from shared memory (A^T, the
//     MN-major view of the same tile, when the chunks are walked in reverse), O += X, the
//     output (fp32 from the accumulators with o_fp32, else stmatrix and 16-byte stores).
//
// Chunks walked in reverse (p.reverse in GLA mode) keep the positions inside a chunk and the
// chunks' alignment in time order, so only the chunk index, the A view and the order of the
// segments change. No gates, no dots, no row divisors in GLA mode.
#pragma once
#include "chunk/chunk_pass_sm90.cuh"

namespace fla {
namespace chunk_sm90 {

template <typename Elem_, int DK_, int kStages_>
struct GlaTraits : Traits<Elem_, DK_> {
  using Base = Traits<Elem_, DK_>;
  using Elem = typename Base::Elem;
  static constexpr int C = Base::C, DK = DK_, BV = Base::BV;
  using LayoutA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<C>, Int<C>>{}));    // (C, C)
  using LayoutAt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{}, Shape<Int<C>, Int<C>>{}));  // A^T view
  using PlainA = chunk::SmemTile<C, C>;
  using MmaAV = decltype(make_tiled_mma(SM90::GMMA::ss_op_selector<Elem, Elem, float, Shape<Int<C>, Int<BV>, Int<C>>,
                                                                   GMMA::Major::K, GMMA::Major::MN>()));
  using MmaAtV = decltype(make_tiled_mma(SM90::GMMA::ss_op_selector<Elem, Elem, float, Shape<Int<C>, Int<BV>, Int<C>>,
                                                                    GMMA::Major::MN, GMMA::Major::MN>()));
  // Shared memory in elements from a 1024-byte aligned base: kStages stages of q~, k~, v, A,
  // A_lo; S^T; then fp32: X (C, BV), kStages stages of the chunk's decays (DK or BV of them).
  // Loads run kStages - 1 chunks ahead.
  static constexpr int kStages = kStages_;
  static constexpr int kQK = C * DK, kV = C * BV, kA = C * C, kSt = BV * DK;
  static constexpr int kOffQ = 0, kOffK = kStages * kQK, kOffV = 2 * kStages * kQK, kOffA = kOffV + kStages * kV;
  static constexpr int kOffAlo = kOffA + kStages * kA;
  static constexpr int kOffSt = kOffAlo + kStages * kA, kOffF32 = kOffSt + kSt;
  static constexpr int kDecay = DK > BV ? DK : BV;
  // states_in of the next chunk (state_dots), by cp.async with the tiles: two fp32 (DK, BV)
  // tiles, rows padded so that the accumulator layout's reads are conflict-free.
  static constexpr int kStateStride = BV + 4;
  static constexpr int kStateTile = DK * kStateStride;
  static constexpr int kBytesNoStates = kOffF32 * int(sizeof(Elem)) + (C * BV + kStages * kDecay) * int(sizeof(float));
  static constexpr int kBytes = kBytesNoStates + kStages * kStateTile * int(sizeof(float));
  static_assert(DK <= 128, "K = 256 tiles leave no room (the sm_80 pass takes them)");
};

// What a walk does with its states besides the output, fixed at compile time: nothing (the
// forward and dv walks), writes each chunk's entering state (states_out: the dq walk of dg), or
// dots it with the forward walk's (state_dots: the dk walk). Each a kernel of its own: with the
// state tiles' code in every walk, the forward and dv walks ran 12-13 us slower. Three stages
// but with state_dots, whose two stages of fp32 state tiles leave no room for a third stage of
// the others.
enum StateIo : int { kNoStates = 0, kStatesOut = 1, kStateDots = 2 };
template <int kIo>
constexpr int gla_pass_stages() { return kIo == kStateDots ? 2 : 3; }

template <typename Elem_, int DK, int kIo>
__global__ void __launch_bounds__(256, 1) chunk_pass_gla_sm90_kernel(const __grid_constant__ ChunkParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tr = GlaTraits<Elem_, DK, gla_pass_stages<kIo>()>;
  using Elem = typename Tr::Elem;
  constexpr int C = Tr::C, BV = Tr::BV, kWg = 128, S = Tr::kStages;

  extern __shared__ unsigned char smem_raw[];
  Elem* const smem = aligned_smem<Elem, Tr::kAlign>(smem_raw);
  Elem* const q_buf = smem + Tr::kOffQ;       // [S][C*DK]
  Elem* const k_buf = smem + Tr::kOffK;       // [S][C*DK]
  Elem* const v_buf = smem + Tr::kOffV;       // [S][C*BV]
  Elem* const a_buf = smem + Tr::kOffA;       // [S][C*C]
  Elem* const alo_buf = smem + Tr::kOffAlo;   // [S][C*C]
  Elem* const st_buf = smem + Tr::kOffSt;     // [BV*DK]
  float* const x_buf = reinterpret_cast<float*>(smem + Tr::kOffF32);   // [C*BV] X, thread-major
  float* const decay_buf = x_buf + C * BV;                              // [S][kDecay]
  float* const state_buf = decay_buf + S * Tr::kDecay;                  // [S][DK][kStateStride]

  const int tile = blockIdx.x, h = blockIdx.y, n = blockIdx.z / p.num_segs, seg = blockIdx.z % p.num_segs;
  const bool reversed = p.reverse;                          // chunks last to first
  const int final_seg = reversed ? 0 : p.num_segs - 1;      // the segment walked last
  if (p.state_only && seg == final_seg) return;
  const bool state_wg = threadIdx.x >= kWg;
  const int tid = threadIdx.x % kWg, warp = tid / 32, lane = tid % 32;
  const int64_t H = p.H, DV = p.DV;
  const chunk::WalkSpan span = chunk::walk_span(p, n, seg);
  const int64_t bos = span.bos, len = span.len, seg_begin = span.seg_begin;
  const int num_chunks = span.num_chunks;
  auto token = [&](int64_t pos) { return bos + pos; };
  auto time_chunk = [&](int c) { return reversed ? num_chunks - 1 - c : c; };
  auto pos0_of = [&](int c) { return seg_begin + int64_t(time_chunk(c)) * C; };
  const int64_t seg_slot0 = chunk::walk_first_slot(p, n, seg_begin);
  auto slot_of = [&](int c) { return seg_slot0 + time_chunk(c); };
  const int decay_dim = p.decay_cols ? p.DV : DK;

  typename Tr::MmaQK mma_qk;   // X = Q~ S; its C layout is O's
  auto thr_qk = mma_qk.get_thread_slice(tid);
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<C>, Int<BV>>{}));
  const int r0 = get<0>(tScS(0));
  constexpr int kX = C * BV / kWg;
  auto x_vec = [&](int j) { return reinterpret_cast<float4*>(x_buf + j * 4 * kWg + 4 * tid); };

  if (state_wg) {
    // ------------------------------------------------------------------ state warpgroup
    constexpr int kVecQK = DK / 8, kRowsQK = kWg / kVecQK, kVecV = BV / 8, kRowsV = kWg / kVecV;
    const int rq0 = tid / kVecQK, cq = tid % kVecQK * 8, rv0 = tid / kVecV, cv = tid % kVecV * 8;
    int smem_off_qk[C / kRowsQK], smem_off_v[C / kRowsV];
    CUTE_UNROLL
    for (int j = 0; j < C / kRowsQK; ++j) smem_off_qk[j] = typename Tr::PlainQK{}(rq0 + j * kRowsQK, cq);
    CUTE_UNROLL
    for (int j = 0; j < C / kRowsV; ++j) smem_off_v[j] = typename Tr::PlainV{}(rv0 + j * kRowsV, cv);
    const Elem* q = static_cast<const Elem*>(p.q) + h * DK;
    const Elem* k = static_cast<const Elem*>(p.k) + h * DK;
    const Elem* v = static_cast<const Elem*>(p.v) + h * DV + tile * BV;
    auto load_chunk = [&](int c, int stage) {
      const int64_t pos0 = pos0_of(c);
      const int rows_left = int(min(int64_t(C), len - pos0));
      const int64_t qk_off = token(pos0 + rq0) * H * DK + cq, qk_step = int64_t(kRowsQK) * H * DK;
      if (!p.state_only)
        copy_chunk_rows<kRowsQK>(q_buf + stage * Tr::kQK, smem_off_qk, q, qk_off, qk_step, rq0, rows_left);
      copy_chunk_rows<kRowsQK>(k_buf + stage * Tr::kQK, smem_off_qk, k, qk_off, qk_step, rq0, rows_left);
      copy_chunk_rows<kRowsV>(v_buf + stage * Tr::kV, smem_off_v, v, token(pos0 + rv0) * H * DV + cv,
                              int64_t(kRowsV) * H * DV, rv0, rows_left);
      // the chunk's decays: per key row, or the tile's state columns (decay_cols); 16-byte vectors
      const float* decay = p.key_decay + (slot_of(c) * H + h) * decay_dim + (p.decay_cols ? tile * BV : 0);
      if (tid < (p.decay_cols ? BV : DK) / 4)
        chunk::cp_async_16(decay_buf + stage * Tr::kDecay + 4 * tid, decay + 4 * tid, true);
      if constexpr (kIo == kStateDots) {   // the forward walk's state at this chunk
        const float* hin = p.states_in + (slot_of(c) * H + h) * DK * DV + int64_t(tile) * BV;
        float* dst = state_buf + stage * Tr::kStateTile;
        CUTE_UNROLL
        for (int j = 0; j < DK * BV / 4 / kWg; ++j) {
          const int e = tid + j * kWg, d = e / (BV / 4), v4 = e % (BV / 4) * 4;
          chunk::cp_async_16(dst + d * Tr::kStateStride + v4, hin + d * DV + v4, true);
        }
      }
    };

    typename Tr::MmaSU mma_su;
    auto thr_su = mma_su.get_thread_slice(tid);
    Tensor accH = partition_fragment_C(mma_su, Shape<Int<BV>, Int<DK>>{});   // (MMA, 1, 1) S^T
    Tensor tHcH = thr_su.partition_C(make_identity_tensor(Shape<Int<BV>, Int<DK>>{}));
    // value i of S^T sits at state column v = get<0>, key row d = get<1>
    auto decay_index = [&](int i) { return p.decay_cols ? get<0>(tHcH(i)) : get<1>(tHcH(i)); };
    auto state_at = [&](int i, int64_t stride_k, int64_t stride_v) {
      return get<1>(tHcH(i)) * stride_k + get<0>(tHcH(i)) * stride_v;
    };
    const int64_t state_off = (int64_t(n) * H + h) * DK * DV + int64_t(tile) * BV * p.state_stride_v;
    if (p.h0 != nullptr && !p.state_only) {
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i) accH(i) = p.h0[state_off + state_at(i, p.state_stride_k, p.state_stride_v)];
    } else {
      clear(accH);
    }
    auto seg_state_off = [&](int s) { return ((int64_t(n) * p.num_segs + s) * H + h) * DK * DV + int64_t(tile) * BV; };
    auto seg_decay = [&](int s) {   // per key row or state column: the product of a segment's decays
      return p.seg_gates + ((int64_t(n) * p.num_segs + s) * H + h) * decay_dim + (p.decay_cols ? tile * BV : 0);
    };
    const int walked_before = reversed ? p.num_segs - 1 - seg : seg;
    if (!p.state_only) {
      for (int i_s = 0; i_s < walked_before; ++i_s) {
        const int s = reversed ? p.num_segs - 1 - i_s : i_s;
        const float* u = p.seg_states + seg_state_off(s);
        const float* a = seg_decay(s);
        CUTE_UNROLL
        for (int i = 0; i < size(accH); ++i) accH(i) = a[decay_index(i)] * accH(i) + u[state_at(i, DV, 1)];
      }
    }
    Tensor sSt = make_tensor(make_smem_ptr(st_buf), typename Tr::LayoutSt{});   // (BV, DK)
    auto sts_state = make_tiled_copy_C(typename Tr::StsmAtom{}, mma_su);
    auto sts_state_thr = sts_state.get_thread_slice(tid);
    Tensor tHsSt = sts_state_thr.partition_D(sSt);
    auto store_state_smem = [&] {
      Tensor rH = make_tensor_like<Elem>(accH);
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i) rH(i) = static_cast<Elem>(accH(i));
      copy(sts_state, sts_state_thr.retile_S(rH), tHsSt);
    };
    // state-only launch: the product of the chunk decays of this block's positions
    Tensor decay_prod = make_tensor_like<float>(accH);
    fill(decay_prod, 1.f);
    const bool scaled = p.scale_update != 1.f;
    const float inv = scaled ? 1.f / p.scale_update : 1.f;

    // the state-only launch runs without the output warpgroup (it has returned)
    const int chunk_bar_threads = p.state_only ? kWg : 2 * kWg;
    load_first_chunks<S>(num_chunks, load_chunk);
    store_state_smem();
    for (int c = 0; c < num_chunks; ++c) {
      const int stage = c % S;
      cp_async_wait<S - 2>();
      fence_view_async_shared();
      bar_sync(kBarChunk, chunk_bar_threads);
      Tensor accX = partition_fragment_C(mma_qk, Shape<Int<C>, Int<BV>>{});   // (MMA, 1, 1)
      if (!p.state_only) {
        const int64_t slot = slot_of(c);
        if constexpr (kIo == kStatesOut) {   // the state entering chunk `slot` ([DK, DV] of the pass)
          float* out = p.states_out + (slot * H + h) * DK * DV + int64_t(tile) * BV;
          CUTE_UNROLL
          for (int i = 0; i < size(accH); ++i) out[state_at(i, DV, 1)] = accH(i);
        }
        if constexpr (kIo == kStateDots) {   // per state column v: sum over key rows of states_in * S
          const float* hin = state_buf + stage * Tr::kStateTile;   // came with the chunk's tiles
          float part[2] = {0.f, 0.f};   // the thread's rows v = r0 and r0 + 8 of S^T
          CUTE_UNROLL
          for (int i = 0; i < size(accH); ++i) part[(i / 2) % 2] += hin[state_at(i, Tr::kStateStride, 1)] * accH(i);
          chunk::sum_over_quad(part);
          if (lane % 4 == 0) {
            CUTE_UNROLL
            for (int j = 0; j < 2; ++j) p.state_dots[(slot * H + h) * DV + tile * BV + get<0>(tHcH(2 * j))] = part[j];
          }
        }
        Tensor sQ = make_tensor(make_smem_ptr(q_buf + stage * Tr::kQK), typename Tr::LayoutQK{});   // (C, DK)
        Tensor tXrQ = thr_qk.partition_fragment_A(sQ);
        Tensor tXrSt = thr_qk.partition_fragment_B(sSt);
        wgmma_issue(mma_qk, tXrQ, tXrSt, accX, true);
      }
      load_chunk_ahead<S>(c, num_chunks, load_chunk);
      cp_async_fence();
      const float* decay = decay_buf + stage * Tr::kDecay;
      if (!p.state_only) {   // X = Q~ S * scale_inter, to the output warpgroup
        warpgroup_wait<0>();
        fence_operand(accX);
        CUTE_UNROLL
        for (int j = 0; j < kX / 4; ++j)
          *x_vec(j) = make_float4(accX(4 * j) * p.scale_inter, accX(4 * j + 1) * p.scale_inter,
                                  accX(4 * j + 2) * p.scale_inter, accX(4 * j + 3) * p.scale_inter);
        bar_arrive(kBarX, 2 * kWg);
      } else {
        CUTE_UNROLL
        for (int i = 0; i < size(accH); ++i) decay_prod(i) *= decay[decay_index(i)];
      }
      // S_{c+1} = decay S_c + su K~^T V, computed as su * (decay S_c / su + K~^T V)
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i) accH(i) *= decay[decay_index(i)] * inv;
      Tensor sKt = make_tensor(make_smem_ptr(k_buf + stage * Tr::kQK), typename Tr::LayoutKt{});  // (DK, C)
      Tensor sVt = make_tensor(make_smem_ptr(v_buf + stage * Tr::kV), typename Tr::LayoutVt{});   // (BV, C)
      Tensor tHrV = thr_su.partition_fragment_A(sVt);
      Tensor tHrK = thr_su.partition_fragment_B(sKt);
      wgmma_issue(mma_su, tHrV, tHrK, accH, false);
      warpgroup_wait<0>();
      fence_operand(accH);
      if (scaled) {
        CUTE_UNROLL
        for (int i = 0; i < size(accH); ++i) accH(i) *= p.scale_update;
      }
      if (!p.state_only) store_state_smem();
    }

    if (p.state_only) {
      float* u = p.seg_states + seg_state_off(seg);
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i) u[state_at(i, DV, 1)] = accH(i);
      // one writer per decay: per key row d, tile 0's threads holding S^T row v = 0 (warp 0,
      // lanes 0-3 cover every d); per state column v, the threads holding d = 0
      float* a = p.seg_gates + ((int64_t(n) * p.num_segs + seg) * H + h) * decay_dim + (p.decay_cols ? tile * BV : 0);
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i) {
        const bool writer = p.decay_cols ? get<1>(tHcH(i)) == 0 : (tile == 0 && get<0>(tHcH(i)) == 0);
        if (writer) a[decay_index(i)] = decay_prod(i);
      }
      return;
    }
    if (p.ht != nullptr && seg == final_seg) {
      CUTE_UNROLL
      for (int i = 0; i < size(accH); ++i) p.ht[state_off + state_at(i, p.state_stride_k, p.state_stride_v)] = accH(i);
    }
  } else {
    // ------------------------------------------------------------------ output warpgroup
    if (p.state_only) return;
    constexpr int kVecA = C / 8, kRowsA = kWg / kVecA;
    const int ra0 = tid / kVecA, ca = tid % kVecA * 8;
    int smem_off_a[C / kRowsA];
    CUTE_UNROLL
    for (int j = 0; j < C / kRowsA; ++j) smem_off_a[j] = typename Tr::PlainA{}(ra0 + j * kRowsA, ca);
    auto load_chunk = [&](int c, int stage) {
      const int64_t pos0 = pos0_of(c);
      const int rows_left = int(min(int64_t(C), len - pos0));
      const int64_t off = token(pos0 + ra0) * H * C + ca, step = int64_t(kRowsA) * H * C;
      if (p.A != nullptr)
        copy_chunk_rows<kRowsA>(a_buf + stage * Tr::kA, smem_off_a, static_cast<const Elem*>(p.A) + h * C, off, step, ra0,
                                rows_left);
      if (p.A_lo != nullptr)
        copy_chunk_rows<kRowsA>(alo_buf + stage * Tr::kA, smem_off_a, static_cast<const Elem*>(p.A_lo) + h * C, off,
                                step, ra0, rows_left);
    };
    typename Tr::MmaAV mma_av;
    typename Tr::MmaAtV mma_atv;
    auto thr_av = mma_av.get_thread_slice(tid);
    auto thr_atv = mma_atv.get_thread_slice(tid);
    auto sts_o = make_tiled_copy_C(typename Tr::StsmAtom{}, mma_qk);
    auto sts_o_thr = sts_o.get_thread_slice(tid);
    Tensor tOcO = thr_qk.partition_C(make_identity_tensor(Shape<Int<C>, Int<BV>>{}));

    load_first_chunks<S>(num_chunks, load_chunk);
    for (int c = 0; c < num_chunks; ++c) {
      const int stage = c % S;
      cp_async_wait<S - 2>();
      fence_view_async_shared();
      bar_sync(kBarChunk, 2 * kWg);
      Tensor accO = partition_fragment_C(mma_qk, Shape<Int<C>, Int<BV>>{});   // (MMA, 1, 1)
      Tensor sVt = make_tensor(make_smem_ptr(v_buf + stage * Tr::kV), typename Tr::LayoutVt{});   // (BV, C)
      // O = A V (+ A_lo V), A^T walking the chunks in reverse; one branch holds each wgmma
      // and its wait (split across branches, ptxas serialises the kernel's wgmma)
      if (p.A == nullptr) {
        clear(accO);
        load_chunk_ahead<S>(c, num_chunks, load_chunk);
        cp_async_fence();
      } else {
        // acc = A V (+ A_lo V) in one wgmma group; each variant holds its own issue and wait
        auto scores_times_v = [&](auto& mma, auto const& thr, auto layout_a) {
          Tensor sA = make_tensor(make_smem_ptr(a_buf + stage * Tr::kA), layout_a);
          Tensor sL = make_tensor(make_smem_ptr(alo_buf + stage * Tr::kA), layout_a);
          Tensor tOrV = thr.partition_fragment_B(sVt);
          fence_operand(accO);
          warpgroup_arrive();
          if (p.A_lo != nullptr) {   // the branch before the first wgmma: one inside the group
                                     // made ptxas add a dummy wgmma and a wait
            wgmma_k(mma, thr.partition_fragment_A(sA), tOrV, accO, true);
            wgmma_k(mma, thr.partition_fragment_A(sL), tOrV, accO, false);
            warpgroup_commit_batch();
            load_chunk_ahead<S>(c, num_chunks, load_chunk);
            cp_async_fence();
            warpgroup_wait<0>();
          } else {
            wgmma_k(mma, thr.partition_fragment_A(sA), tOrV, accO, true);
            warpgroup_commit_batch();
            load_chunk_ahead<S>(c, num_chunks, load_chunk);
            cp_async_fence();
            warpgroup_wait<0>();
          }
          fence_operand(accO);
        };
        if (!reversed) scores_times_v(mma_av, thr_av, typename Tr::LayoutA{});
        else scores_times_v(mma_atv, thr_atv, typename Tr::LayoutAt{});
      }
      bar_sync(kBarX, 2 * kWg);            // X is in
      CUTE_UNROLL
      for (int j = 0; j < kX / 4; ++j) {
        const float4 x = *x_vec(j);
        accO(4 * j) += x.x;
        accO(4 * j + 1) += x.y;
        accO(4 * j + 2) += x.z;
        accO(4 * j + 3) += x.w;
      }
      const int64_t pos0 = pos0_of(c);
      if (p.o_fp32) {
        float* o = static_cast<float*>(p.o) + h * DV + tile * BV;
        CUTE_UNROLL
        for (int i = 0; i < size(accO); i += 2) {
          const int64_t pos = pos0 + get<0>(tOcO(i));
          if (pos < len)
            *reinterpret_cast<float2*>(o + token(pos) * H * DV + get<1>(tOcO(i))) = make_float2(accO(i), accO(i + 1));
        }
      } else {   // through the chunk's q~ tile (read by X, which is done)
        Elem* so = q_buf + stage * Tr::kQK;
        Tensor sO = make_tensor(make_smem_ptr(so), typename Tr::LayoutO{});   // (C, BV)
        Tensor rO = make_tensor_like<Elem>(accO);
        CUTE_UNROLL
        for (int i = 0; i < size(accO); ++i) rO(i) = static_cast<Elem>(accO(i));
        copy(sts_o, sts_o_thr.retile_S(rO), sts_o_thr.partition_D(sO));
        __syncwarp();
        chunk::store_warp_rows<BV>(
            static_cast<Elem*>(p.o) + h * DV + tile * BV, H * DV,
            [&](int r, int col) { return so + typename Tr::PlainV{}(r, col); }, warp, lane, pos0, len, token);
      }
    }
  }
#else
  __trap();   // built without sm_90a: the host never launches this
#endif
}

}  // namespace chunk_sm90

template <typename Elem, int DK, int kIo>
void launch_chunk_pass_gla_sm90(const ChunkParams& p, cudaStream_t stream) {
  using Tr = chunk_sm90::GlaTraits<Elem, DK, chunk_sm90::gla_pass_stages<kIo>()>;
  auto kernel = chunk_sm90::chunk_pass_gla_sm90_kernel<Elem, DK, kIo>;
  const int io = p.state_dots != nullptr ? chunk_sm90::kStateDots
                 : p.states_out != nullptr ? chunk_sm90::kStatesOut : chunk_sm90::kNoStates;
  if (io != kIo || (p.state_dots != nullptr && p.states_out != nullptr))
    throw std::invalid_argument("fla_cuda: GLA pass launched as the wrong variant for its states");
  const int smem = kIo == chunk_sm90::kStateDots ? Tr::kBytes : Tr::kBytesNoStates;
  launch_with_smem(kernel, dim3(p.DV / Tr::BV, p.H, p.N * p.num_segs), Tr::kThreads, smem + Tr::kAlign, smem + Tr::kAlign,
                   stream, p);
}

template <typename Elem, int DK>
void run_chunk_pass_gla_sm90(const ChunkParams& p, cudaStream_t stream) {
  launch_chunk_pass_gla_sm90<Elem, DK, chunk_sm90::kNoStates>(p, stream);
}

template <typename Elem, int DK>
void run_chunk_pass_gla_sm90_states(const ChunkParams& p, cudaStream_t stream) {
  launch_chunk_pass_gla_sm90<Elem, DK, chunk_sm90::kStatesOut>(p, stream);
}

template <typename Elem, int DK>
void run_chunk_pass_gla_sm90_dots(const ChunkParams& p, cudaStream_t stream) {
  launch_chunk_pass_gla_sm90<Elem, DK, chunk_sm90::kStateDots>(p, stream);
}

}  // namespace fla
