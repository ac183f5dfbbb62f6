// gla_bwd_intra (math in gla.h): one thread block = one (chunk, head); 4 warps, warp w owns
// sub-chunk w (rows 16w..16w+15) of every output.
//
//   1. dA = scale * dO V^T (j <= i) on tensor cores over 64-column slices of V, kept as
//      bf16/fp16 hi + lo operands (about 16 mantissa bits)
//   2. per 64-column slice of K: the gates G (the forward's scan, log2 units), then folds of K
//      and Q that every warp shares, each split into hi + lo operands (a product is
//      Ah Fh + Al Fh + Ah Fl: fp32-grade, as FLA's tf32/fp32 blocks). With S_b, E_b the
//      gates at the first and last row of sub-chunk b, K folds at S_b and Q folds at E_b:
//        K~_j = K_j 2^(S_b - G_j),  Q~_i = Q_i 2^(G_i - E_b)      (<= 2^-span of the sub-chunk)
//      and, per column, sums over sub-chunks in Horner form with factors <= 1:
//        dq_w = 2^(G - S_w) [2^(S_w - S_{w-1}) (.. dA[w,0] K~_0 ..) + dA[w,w] K~_w]
//        dk_w = 2^(E_w - G) [2^(E_{w+1} - E_w) (.. dA[3,w]^T Q~_3 ..) + dA[w,w]^T Q~_w]
//      A slice where some sub-chunk's span passes max_fold_span2 (the forward's test) takes
//      the diagonal pair by pair in fp32 (2^(G_i - G_j) <= 1) and the other blocks from folds
//      with factors <= 1: K^_j = K_j 2^(E_b - G_j), Q^_i = Q_i 2^(G_i - S_b).
//      The epilogue adds the gated inter-chunk parts P, R and runs in the accumulator layout.
//   3. dg = (q dq - k dk summed to the chunk's end) + exp(G_last) state_dots of the chunk
//      + (k dk_inter summed over the chunk), 0 where the gate was clamped (gla.h); d = q dq -
//      k dk leaves the accumulator layout through shared memory for a column pass (a warp per
//      sub-chunk's rows, a column pair per lane) that sums it bottom up and stores dg by rows
//
// Inputs arrive by cp.async a step ahead: the dO, V slices of step 1 double-buffered, the
// first K-slice's q, k and gates during step 1, each next one during the previous slice's dg.
#pragma once
#include "chunk/gla_intra_kernel.cuh"

namespace fla {
namespace chunk {

template <typename Elem_>
struct BwdIntraTraits {
  using Elem = typename CuteType<Elem_>::type;
  static constexpr int C = kChunk, KS = 64, S = 16, kThreads = 128;
  static_assert(C == 4 * S, "a warp per sub-chunk");
  using TiledMma = typename Traits<Elem_, 64>::TiledMma;   // 4 warps along M
  using LdsmN = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;
  using LdsmT = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;
  using LayoutF = SmemTile<C, KS>;     // (C, KS) slices and folds
  using LayoutFt = SmemTileT<C, KS>;   // read as (KS, C)
  using LayoutA = SmemTile<C, C>;      // dA
  using LayoutAt = SmemTileT<C, C>;    // dA^T
  // raw q, k and the gates: rows padded so that the accumulator layout's reads (8 rows x 4
  // column pairs) hit distinct banks
  static constexpr int LDQ = KS + 8, LDG = KS + 8;
  // fold tiles, hi then lo, in rows of KS: K^ (sub-chunks 0..2), K~, Q^ (1..3), Q~
  static constexpr int kKeRows = C - S, kQsRows = C - S;
  static constexpr int kKe = 0, kKd = kKe + 2 * kKeRows, kQs = kKd + 2 * C, kQd = kQs + 2 * kQsRows;
  static constexpr int kFoldRows = kQd + 2 * C;
  static constexpr int kElems = 2 * C * LDQ + 2 * C * C + kFoldRows * KS;
  static constexpr int kFloats = C * LDG + 2 * KS + 8 * KS + 2 * KS;
  static constexpr int kSmemBytes = kElems * int(sizeof(Elem)) + kFloats * 4;
  static_assert(kSmemBytes <= 113 * 1024, "two blocks per SM");
};

template <typename Elem_>
__global__ void __launch_bounds__(128) gla_bwd_intra_kernel(const __grid_constant__ GlaBwdIntraParams p) {
  using Tr = BwdIntraTraits<Elem_>;
  using Elem = typename Tr::Elem;
  using Vec = cute::uint128_t;
  constexpr int C = Tr::C, KS = Tr::KS, S = Tr::S, kThreads = Tr::kThreads, LDQ = Tr::LDQ, LDG = Tr::LDG;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Elem* const sAh = reinterpret_cast<Elem*>(smem_raw);      // (C, C) dA hi
  Elem* const sAl = sAh + C * C;                             // (C, C) dA lo
  Elem* const sFold = sAl + C * C;                           // (kFoldRows, KS) fold tiles
  Elem* const sQ = sFold + Tr::kFoldRows * KS;               // [C][LDQ] raw q slice
  Elem* const sK = sQ + C * LDQ;                             // [C][LDQ] raw k slice
  float* const sG = reinterpret_cast<float*>(sK + C * LDQ);  // [C][LDG] cumulative gates, log2 units
  float* const sTot = sG + C * LDG;                          // [2][KS] gate totals of the two halves
  float* const sWT = sTot + 2 * KS;                          // [4][KS] per-warp sums of d
  float* const sWE = sWT + 4 * KS;                           // [4][KS] per-warp sums of k dk_inter
  uint32_t* const sClamp = reinterpret_cast<uint32_t*>(sWE + 4 * KS);   // [2][KS] clamped-row bits

  const int slot = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t H = p.H, K = p.K, V = p.V;
  ChunkLoc loc;
  if (!locate_chunk(slot, p.cu_seqlens, p.chunk_offsets, p.N, p.T, loc)) return;
  const int64_t t0 = loc.bos + loc.c * C;
  const int rows = int(min(int64_t(C), loc.len - loc.c * C));   // rows past it: zeros, gates 0
  constexpr int kVecs = C * KS / 8 / kThreads;
  const int gcol = tid % KS, ghalf = tid / KS, grow0 = ghalf * (C / 2);
  const int64_t row_stride = H * K, head_off = (t0 * H + h) * K;

  // A slice's raw q, k (into sQ, sK) and gates (staged in the fold tiles' space, past step 1's
  // dO and V tiles) by cp.async, a step ahead: during dA for the first slice, during the
  // previous slice's dg for the others. Rows past the chunk are zero-filled.
  const int kGateStage = 2 * C * KS;   // elements of sFold
  auto prefetch_slice = [&](int col0) {
    // the thread's offsets recomputed per call: hoisted out of the slice loop, they held ~20
    // registers through it and made ptxas spill
    int t = tid;
    asm volatile("" : "+r"(t));
    // vector m of thread t: row t / 8 + 16 m, columns t % 8 * 8..; rows past the chunk read
    // nothing (zero fill) from the chunk's first row
    constexpr int kRowStep = kThreads / (KS / 8);
    const int r0 = t / (KS / 8), c8 = t % (KS / 8) * 8;
    const int64_t off0 = head_off + col0 + c8, off = off0 + r0 * row_stride;
    CUTE_UNROLL
    for (int m = 0; m < kVecs; ++m) {
      const int r = r0 + kRowStep * m;
      const bool valid = r < rows;
      const int64_t src = valid ? off + kRowStep * m * row_stride : off0;
      cp_async_16(sQ + r * LDQ + c8, static_cast<const Elem*>(p.q) + src, valid);
      cp_async_16(sK + r * LDQ + c8, static_cast<const Elem*>(p.k) + src, valid);
    }
    {   // the slice's P and R rows into L2: the epilogues' register loads then wait on L2
      const int r = t / 2, line = t % 2;   // 64 rows x two 128-byte lines of fp32
      if (r < rows) {
        const int64_t off = head_off + col0 + r * row_stride + line * 32;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p.dq_inter + off));
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p.dk_inter + off));
      }
    }
    if (p.g_fp32) {
      float* stage = reinterpret_cast<float*>(sFold + kGateStage);
      const float* g = static_cast<const float*>(p.g) + head_off + col0;
      constexpr int kStep = kThreads / (KS / 4);
      const int g0 = t / (KS / 4), c4 = t % (KS / 4) * 4;
      const float* src = g + c4 + g0 * row_stride;
      CUTE_UNROLL
      for (int m = 0; m < 2 * kVecs; ++m, src += kStep * row_stride) {
        const int r = g0 + kStep * m;
        const bool valid = r < rows;
        cp_async_16(stage + r * KS + c4, valid ? src : g, valid);
      }
    } else {
      Elem* stage = sFold + kGateStage;
      const Elem* g = static_cast<const Elem*>(p.g) + head_off + col0;
      CUTE_UNROLL
      for (int m = 0; m < kVecs; ++m) {
        const int u = t + kThreads * m, r = u / (KS / 8), c8 = u % (KS / 8) * 8;
        const bool valid = r < rows;
        cp_async_16(stage + r * KS + c8, g + (valid ? r * row_stride + c8 : 0), valid);
      }
    }
    cp_async_fence();
  };
  // this thread's raw gates (column gcol, rows grow0..) from the staged slice
  auto staged_gates = [&](float (&rg)[C / 2]) {
    auto read = [&](const auto* stage) {
      CUTE_UNROLL
      for (int i = 0; i < C / 2; ++i) rg[i] = static_cast<float>(stage[(grow0 + i) * KS + gcol]);
    };
    if (p.g_fp32)
      read(reinterpret_cast<const float*>(sFold + kGateStage));
    else
      read(sFold + kGateStage);
  };
  // dO and V slices of step 1, double-buffered in the fold tiles' space: 0 and 32 KB (the first
  // K-slice's gates are staged between them)
  auto dv_stage = [&](int i) { return sFold + (i % 2 ? 4 * C * KS : 0); };
  static_assert(6 * C * KS <= Tr::kFoldRows * KS, "two dO, V stages and the gates fit the fold tiles");
  auto prefetch_dv = [&](int i) {
    int t = tid;
    asm volatile("" : "+r"(t));
    Elem* const sDO = dv_stage(i);    // (C, KS) at tile64_offset
    Elem* const sVs = sDO + C * KS;   // (C, KS)
    constexpr int kRowStep = kThreads / (KS / 8);
    const int r0 = t / (KS / 8), c8 = t % (KS / 8) * 8;
    const int64_t off0 = (t0 * H + h) * V + i * KS + c8;
    CUTE_UNROLL
    for (int m = 0; m < kVecs; ++m) {
      const int r = r0 + kRowStep * m;
      const bool valid = r < rows;
      const int64_t src = off0 + (valid ? r * H * V : 0);
      cp_async_16(sDO + tile64_offset(r, c8), static_cast<const Elem*>(p.dout) + src, valid);
      cp_async_16(sVs + tile64_offset(r, c8), static_cast<const Elem*>(p.v) + src, valid);
    }
    cp_async_fence();
  };
  prefetch_dv(0);
  prefetch_slice(0);

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);

  // 1. dA = scale * dO V^T
  Tensor accA = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});        // (MMA, MMA_M, MMA_N)
  clear(accA);
  {
    const int n_slices = V / KS;
    for (int i = 0; i < n_slices; ++i) {
      if (i + 1 < n_slices) prefetch_dv(i + 1);
      // dO, V of slice i in: the groups issued after it (the first K-slice's q, k, gates after
      // slice 0; the next dO, V slice) may stay in flight
      if (i + 1 < n_slices) {
        if (i == 0) cp_async_wait<2>();
        else cp_async_wait<1>();
      } else {
        if (i == 0) cp_async_wait<1>();
        else cp_async_wait<0>();
      }
      __syncthreads();
      Tensor sDOt = make_tensor(make_smem_ptr(dv_stage(i)), typename Tr::LayoutF{});          // (C, KS)
      Tensor sVt = make_tensor(make_smem_ptr(dv_stage(i) + C * KS), typename Tr::LayoutF{});  // (C, KS)
      gemm_ss<Tr>(accA, sDOt, sVt, typename Tr::LdsmN{}, typename Tr::LdsmN{}, tid);
      __syncthreads();
    }
  }
  Tensor tAh = make_tensor(make_smem_ptr(sAh), typename Tr::LayoutA{});     // (C, C)
  Tensor tAl = make_tensor(make_smem_ptr(sAl), typename Tr::LayoutA{});     // (C, C)
  Tensor tAht = make_tensor(make_smem_ptr(sAh), typename Tr::LayoutAt{});   // (C, C) dA^T
  Tensor tAlt = make_tensor(make_smem_ptr(sAl), typename Tr::LayoutAt{});   // (C, C)
  {
    // the m16n8 accumulator layout (as row_of, col_of below): value i at row
    // 16 w + lane / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (lane % 4) + i % 2
    CUTE_STATIC_ASSERT_V(size(accA) == Int<C / 2>{});
    const int row0 = warp * S + lane / 4, c0 = 2 * (lane % 4);
    CUTE_UNROLL
    for (int i = 0; i < size(accA); ++i)
      accA(i) = c0 + 8 * (i / 4) + i % 2 <= row0 + 8 * (i / 2 % 2) ? accA(i) * p.scale : 0.f;
    Tensor tSsAh = thr_mma.partition_C(tAh);
    store_pairs(accA, tSsAh);
    CUTE_UNROLL
    for (int i = 0; i < size(accA); ++i) accA(i) -= static_cast<float>(static_cast<Elem>(accA(i)));
    Tensor tSsAl = thr_mma.partition_C(tAl);
    store_pairs(accA, tSsAl);
  }
  // dA(i, j) in fp32 (hi + lo), for the pair-by-pair diagonal
  auto dA_at = [&](int i, int j) { return static_cast<float>(tAh(i, j)) + static_cast<float>(tAl(i, j)); };

  // 2. slices of K. Fold tiles, (C, KS) with row j the fold of row j: base pointers for the
  // per-element stores (at tile64_offset: no CuTe coordinate arithmetic in the per-element
  // code) and (KS, C) views, the products' B operands. The Q^ tiles start at row S.
  static_assert(std::is_same_v<typename Tr::LayoutF, SmemTile<C, 64>>, "tile64_offset");
  Elem* const pKeh = sFold + Tr::kKe * KS;
  Elem* const pKel = sFold + (Tr::kKe + Tr::kKeRows) * KS;
  Elem* const pKdh = sFold + Tr::kKd * KS;
  Elem* const pKdl = sFold + (Tr::kKd + C) * KS;
  Elem* const pQsh = sFold + (Tr::kQs - S) * KS;
  Elem* const pQsl = sFold + (Tr::kQs + Tr::kQsRows - S) * KS;
  Elem* const pQdh = sFold + Tr::kQd * KS;
  Elem* const pQdl = sFold + (Tr::kQd + C) * KS;
  auto fold_t = [](Elem* base) { return make_tensor(make_smem_ptr(base), typename Tr::LayoutFt{}); };
  auto sKehT = fold_t(pKeh), sKelT = fold_t(pKel), sKdhT = fold_t(pKdh), sKdlT = fold_t(pKdl);   // (KS, C)
  auto sQshT = fold_t(pQsh), sQslT = fold_t(pQsl), sQdhT = fold_t(pQdh), sQdlT = fold_t(pQdl);
  // three products of k16 block kb: (Ah + Al)(Fh + Fl) less Al Fl, each operand loaded once
  auto mma3 = [&](auto& acc, auto const& ah, auto const& al, auto const& fh, auto const& fl, auto copy_atom_a, int kb) {
    auto copy_a = make_tiled_copy_A(copy_atom_a, mma);
    auto copy_b = make_tiled_copy_B(typename Tr::LdsmT{}, mma);
    auto thr_a = copy_a.get_thread_slice(tid);
    auto thr_b = copy_b.get_thread_slice(tid);
    Tensor rAh = thr_mma.partition_fragment_A(ah), rAl = thr_mma.partition_fragment_A(al);   // (MMA, MMA_M, MMA_K)
    Tensor rFh = thr_mma.partition_fragment_B(fh), rFl = thr_mma.partition_fragment_B(fl);   // (MMA, MMA_N, MMA_K)
    CUTE_STATIC_ASSERT_V(size<1>(rAh) == size<1>(acc) && size<1>(rFh) == size<2>(acc));
    copy(copy_a, thr_a.partition_S(ah)(_, _, kb), thr_a.retile_D(rAh)(_, _, kb));
    copy(copy_a, thr_a.partition_S(al)(_, _, kb), thr_a.retile_D(rAl)(_, _, kb));
    copy(copy_b, thr_b.partition_S(fh)(_, _, kb), thr_b.retile_D(rFh)(_, _, kb));
    copy(copy_b, thr_b.partition_S(fl)(_, _, kb), thr_b.retile_D(rFl)(_, _, kb));
    gemm(mma, rAh(_, _, kb), rFh(_, _, kb), acc);
    gemm(mma, rAl(_, _, kb), rFh(_, _, kb), acc);
    gemm(mma, rAh(_, _, kb), rFl(_, _, kb), acc);
  };

  const int r_w = warp * S;   // this warp's rows
  // this thread's accumulator values: value 2u, 2u + 1 sit at row tCc(2u), columns c, c + 1;
  // u even: row r_w + lane / 4, u odd: 8 rows below; u / 2: the n8 block of the columns
  Tensor tCc = thr_mma.partition_C(make_identity_tensor(Shape<Int<C>, Int<KS>>{}));   // (MMA, MMA_M, MMA_N)
  constexpr int kPairs = decltype(size(tCc))::value / 2;
  static_assert(kPairs == 16, "m16n8 accumulators: 8 n-blocks x 2 rows");
  // (the m16n8 accumulator layout written out, as unsigned arithmetic: CuTe's signed
  // coordinate divisions were 3% of all instructions where ptxas recomputes them)
  const unsigned lane_u = threadIdx.x % 32u;
  auto row_of = [&](int u) { return r_w + int(lane_u / 4u) + 8 * (u % 2); };
  auto col_of = [&](int u) { return 8 * (u / 2) + int(lane_u % 4u) * 2; };
  // pairs of adjacent elements as one register (packed conversions: pack_pair)
  auto pair_at = [](const Elem* base) { return unpack_pair<Elem>(*reinterpret_cast<const uint32_t*>(base)); };
  auto g_at = [&](int r, int c) { return *reinterpret_cast<const float2*>(sG + r * LDG + c); };
  auto exp2_diff = [](float2 a, float2 b) { return make_float2(exp2_ftz(a.x - b.x), exp2_ftz(a.y - b.y)); };
  // x (columns c, c + 1 of a fold row) as hi + lo parts, at element offset `off` of two tiles
  auto split_store = [](float2 x, Elem* hi_t, Elem* lo_t, int off) {
    const uint32_t hi = pack_pair<Elem>(x.x, x.y);
    const float2 h = unpack_pair<Elem>(hi);
    *reinterpret_cast<uint32_t*>(hi_t + off) = hi;
    *reinterpret_cast<uint32_t*>(lo_t + off) = pack_pair<Elem>(x.x - h.x, x.y - h.y);
  };
  auto elem_pair = [](float a, float b) { return pack_pair<Elem>(a, b); };
  // acc *= 2^(G[r_new] - G[r_old]) column by column (<= 1: r_new after r_old)
  auto rescale = [&](auto& acc, int r_new, int r_old) {
    CUTE_UNROLL
    for (int u = 0; u < kPairs; u += 2) {
      const float2 f = exp2_diff(g_at(r_new, col_of(u)), g_at(r_old, col_of(u)));
      acc(2 * u) *= f.x;
      acc(2 * u + 1) *= f.y;
      acc(2 * u + 2) *= f.x;
      acc(2 * u + 3) *= f.y;
    }
  };
  // this warp's 16 rows of a staged (C, KS) tile out to global rows of `dst` (16-byte stores)
  auto copy_rows_out = [&](const Elem* tile, void* dst, int64_t off0) {
    __syncwarp();
    CUTE_UNROLL
    for (int m = 0; m < S * KS / 8 / 32; ++m) {
      const int e = lane + 32 * m, r = r_w + e / (KS / 8), c8 = e % (KS / 8) * 8;
      if (r < rows)
        *reinterpret_cast<Vec*>(static_cast<Elem*>(dst) + off0 + r * row_stride + c8) =
            *reinterpret_cast<const Vec*>(tile + tile64_offset(r, c8));
    }
  };

  for (int col0 = 0; col0 < K; col0 += KS) {
    // gates and raw q, k of the slice (prefetched); `exact`: some sub-chunk decays too strongly
    // to fold
    bool exact;
    {
      cp_async_wait<0>();
      __syncthreads();
      float rg[C / 2];
      staged_gates(rg);
      uint32_t clamped = 0;   // rows (of this half) whose gate the scan clamps: dg is 0 there
      float lowest = rg[0];
      CUTE_UNROLL
      for (int i = 1; i < C / 2; ++i) lowest = fminf(lowest, rg[i]);
      if (lowest < kMinLogGate) {   // rare: the bits row by row
        CUTE_UNROLL
        for (int i = 0; i < C / 2; ++i) clamped |= uint32_t(rg[i] < kMinLogGate) << i;
      }
      sClamp[ghalf * KS + gcol] = clamped;
      exact = scan_slice_gates<Elem, KS>(rg, sTot, sG, LDG, ghalf, gcol, grow0, gcol);   // (its barriers: the
                                                                                  // staged gates are read)
    }

    // the rest of the slice, compiled twice: the rare `exact` variant stays out of the hot
    // code (instruction-cache misses were half of all stalls with it inline)
    auto slice = [&](auto exact_c) __attribute__((always_inline)) {
      constexpr bool kExact = decltype(exact_c)::value;
      const int64_t out0 = head_off + col0;
      // dq and dk leave through (C, KS) tiles of folds this variant leaves unused (the other
      // warps may still read any row of the ones it uses), each warp through its own rows
      Elem* const dq_stage = kExact ? pKdh : pKeh;
      Elem* const dk_stage = kExact ? pQdh : sFold + Tr::kQs * KS;
      static_assert(Tr::kKe + C <= Tr::kKd && Tr::kQs + C <= Tr::kQd, "staging tiles inside the unused folds");
      float2 pin[kPairs], rin[kPairs];
      auto load_pairs = [&](float2 (&x)[kPairs], const float* src) {
        // two row pointers (u even, u odd), the columns as immediate offsets
        const float* row0 = src + out0 + row_of(0) * row_stride + col_of(0);
        const float* row1 = row0 + (row_of(1) - row_of(0)) * row_stride;
        CUTE_UNROLL
        for (int u = 0; u < kPairs; ++u) {
          const float* at = (u % 2 ? row1 : row0) + (col_of(u) - col_of(0));
          x[u] = row_of(u) < rows ? __ldg(reinterpret_cast<const float2*>(at)) : make_float2(0.f, 0.f);
        }
      };
      load_pairs(pin, p.dq_inter);   // the dq epilogue's P, in flight during the folds

      // folds, shared by the warps: this thread takes rows warp + 4 m (sub-chunk m / 4) of its
      // lane's column pair
      {
        const int cc = 2 * lane;
        CUTE_UNROLL
        for (int b = 0; b < 4; ++b) {
          const float2 s_b = g_at(b * S, cc), e_b = g_at(b * S + S - 1, cc);
          CUTE_UNROLL
          for (int m = 0; m < S / 4; ++m) {
            const int j = b * S + warp + 4 * m, off = tile64_offset(j, cc);
            const float2 gj = g_at(j, cc);
            const float2 kj = pair_at(sK + j * LDQ + cc), qj = pair_at(sQ + j * LDQ + cc);
            if constexpr (!kExact) {
              // K~ = K 2^(S_b - G_j), Q~ = Q 2^(G_j - E_b) (<= 2^-span, bounded here): the
              // diagonal blocks' operands, and the off-diagonal ones too, the Horner sums
              // then referred to S_b (dq) and E_a (dk)
              const float2 fk = exp2_diff(s_b, gj), fq = exp2_diff(gj, e_b);
              split_store(make_float2(kj.x * fk.x, kj.y * fk.y), pKdh, pKdl, off);
              split_store(make_float2(qj.x * fq.x, qj.y * fq.y), pQdh, pQdl, off);
            } else {
              // strong decay: the diagonal pair by pair (its factors may overflow), off the
              // diagonal K^ = K 2^(E_b - G_j), Q^ = Q 2^(G_j - S_b) (<= 1)
              if (b < 3) {
                const float2 f = exp2_diff(e_b, gj);
                split_store(make_float2(kj.x * f.x, kj.y * f.y), pKeh, pKel, off);
              }
              if (b > 0) {
                const float2 f = exp2_diff(gj, s_b);
                split_store(make_float2(qj.x * f.x, qj.y * f.y), pQsh, pQsl, off);
              }
            }
          }
        }
      }
      __syncthreads();

      // dq: sub-chunks b < w, then the diagonal one
      Tensor acc = partition_fragment_C(mma, Shape<Int<C>, Int<KS>>{});   // (MMA, MMA_M, MMA_N)
      CUTE_STATIC_ASSERT_V(size(acc) == size(tCc));
      clear(acc);
      CUTE_UNROLL
      for (int b = 0; b < 4; ++b) {
        if constexpr (!kExact) {   // K~ of sub-chunks b <= w, each at its first row S_b
          if (b <= warp) {
            if (b > 0) rescale(acc, b * S, b * S - S);
            mma3(acc, tAh, tAl, sKdhT, sKdlT, typename Tr::LdsmN{}, b);
          }
        } else if (b < warp) {     // K^ of sub-chunks b < w, each at its last row E_b
          if (b > 0) rescale(acc, b * S + S - 1, b * S - 1);
          mma3(acc, tAh, tAl, sKehT, sKelT, typename Tr::LdsmN{}, b);
        }
      }
      if (kExact && warp > 0) rescale(acc, r_w, r_w - 1);   // at S_w (the diagonal: the epilogue)

      float2 d[kPairs];   // q dq, then q dq - k dk
      // the epilogues' shared-memory reads: the thread's first pair (u = 0) plus immediate
      // offsets (u odd: 8 rows down, u / 2: the n8 block), the per-column gates once per
      // column pair (u even; u + 1 shares them: the stores between keep the compiler from
      // reusing the loads itself)
      const int g_off0 = row_of(0) * LDG + col_of(0), q_off0 = row_of(0) * LDQ + col_of(0);
      auto g_row = [&](int u) { return sG + g_off0 + (u % 2) * 8 * LDG + (u / 2) * 8; };
      auto qk_row = [&](const Elem* base, int u) { return base + q_off0 + (u % 2) * 8 * LDQ + (u / 2) * 8; };
      float2 col_gate, col_decay;
      CUTE_UNROLL
      for (int u = 0; u < kPairs; ++u) {
        const int r = row_of(u), c = col_of(u);
        const float2 g = *reinterpret_cast<const float2*>(g_row(u)), qv = pair_at(qk_row(sQ, u));
        // 2^G P + 2^(G - G_q) acc = 2^(G - G_q) (2^G_q P + acc): one exp2 per element
        if (u % 2 == 0) {
          col_gate = g_at(r_w, c);
          col_decay = exp2_diff(col_gate, make_float2(0.f, 0.f));
        }
        const float2 f = exp2_diff(g, col_gate);
        float x0 = f.x * fmaf(col_decay.x, pin[u].x, acc(2 * u));
        float x1 = f.y * fmaf(col_decay.y, pin[u].y, acc(2 * u + 1));
        if constexpr (kExact) {   // the diagonal block pair by pair: sum_{16w <= j <= r} dA_rj k_j 2^(G_r - G_j)
          for (int j = r_w; j <= r; ++j) {
            const float a = dA_at(r, j);
            const float2 gj = g_at(j, c), kj = pair_at(sK + j * LDQ + c);
            x0 += a * kj.x * exp2_ftz(g.x - gj.x);
            x1 += a * kj.y * exp2_ftz(g.y - gj.y);
          }
        }
        d[u] = make_float2(qv.x * x0, qv.y * x1);
        *reinterpret_cast<uint32_t*>(dq_stage + tile64_offset(r, c)) = elem_pair(x0, x1);
      }
      copy_rows_out(dq_stage, p.dq, out0);
      load_pairs(rin, p.dk_inter);   // in flight during dk's products

      // dk: sub-chunks a > w from the last one down, then the diagonal one
      clear(acc);
      CUTE_UNROLL
      for (int a = 3; a >= 0; --a) {
        if constexpr (!kExact) {   // Q~ of sub-chunks a >= w, each at its last row E_a
          if (a >= warp) {
            if (a < 3) rescale(acc, a * S + 2 * S - 1, a * S + S - 1);
            mma3(acc, tAht, tAlt, sQdhT, sQdlT, typename Tr::LdsmT{}, a);
          }
        } else if (a > warp) {     // Q^ of sub-chunks a > w, each at its first row S_a
          if (a < 3) rescale(acc, a * S + S, a * S);
          mma3(acc, tAht, tAlt, sQshT, sQslT, typename Tr::LdsmT{}, a);
        }
      }
      if (kExact && warp < 3) rescale(acc, r_w + S, r_w + S - 1);   // at E_w (the diagonal: the epilogue)
      float2 kdi[kPairs / 2];   // k dk_inter of each column pair, both rows
      CUTE_UNROLL
      for (int u = 0; u < kPairs; ++u) {
        const int r = row_of(u), c = col_of(u);
        const float2 g = *reinterpret_cast<const float2*>(g_row(u)), kv = pair_at(qk_row(sK, u));
        // 2^(G_last - G) R = 2^(G_k - G) 2^(G_last - G_k) R: one exp2 per element
        if (u % 2 == 0) {
          col_gate = g_at(r_w + S - 1, c);
          col_decay = exp2_diff(g_at(C - 1, c), col_gate);
        }
        const float2 f = exp2_diff(col_gate, g);
        const float i0 = f.x * (col_decay.x * rin[u].x), i1 = f.y * (col_decay.y * rin[u].y);
        kdi[u / 2] = u % 2 ? make_float2(kdi[u / 2].x + kv.x * i0, kdi[u / 2].y + kv.y * i1) : make_float2(kv.x * i0, kv.y * i1);
        float x0 = fmaf(f.x, acc(2 * u), i0);
        float x1 = fmaf(f.y, acc(2 * u + 1), i1);
        if constexpr (kExact) {   // sum_{r <= i < 16w + 16} dA_ir q_i 2^(G_i - G_r)
          for (int i = r; i < r_w + S; ++i) {
            const float a = dA_at(i, r);
            const float2 gi = g_at(i, c), qi = pair_at(sQ + i * LDQ + c);
            x0 += a * qi.x * exp2_ftz(gi.x - g.x);
            x1 += a * qi.y * exp2_ftz(gi.y - g.y);
          }
        }
        d[u].x -= kv.x * x0;
        d[u].y -= kv.y * x1;
        *reinterpret_cast<uint32_t*>(dk_stage + tile64_offset(r, c)) = elem_pair(x0, x1);
      }
      copy_rows_out(dk_stage, p.dk, out0);

      // 3. dg: d summed from each row to the chunk's end, plus the part of the later chunks.
      // The warps' column sums of k dk_inter by shuffles; d itself through shared memory (sD,
      // the fold tiles' first 16 KB, free once every warp's products are done) to a column
      // pass, where warp w sums rows 16w..16w+15 of the column pair cp from the bottom up and
      // stores whole 256-byte rows of dg
      CUTE_UNROLL
      for (int u = 0; u < kPairs; u += 2) {
        CUTE_UNROLL
        for (int off = 4; off < 32; off *= 2) {
          kdi[u / 2].x += __shfl_xor_sync(0xffffffffu, kdi[u / 2].x, off);
          kdi[u / 2].y += __shfl_xor_sync(0xffffffffu, kdi[u / 2].y, off);
        }
        if (lane < 4) *reinterpret_cast<float2*>(sWE + warp * KS + col_of(u)) = kdi[u / 2];
      }
      const int cp = 2 * lane;
      const float2 next = __ldg(reinterpret_cast<const float2*>(p.state_dots + (int64_t(slot) * H + h) * K + col0 + cp));
      __syncthreads();   // q, k, the folds and the staging space are free: the next slice's loads
      if (col0 + KS < K) prefetch_slice(col0 + KS);
      float* const sD = reinterpret_cast<float*>(sFold);   // (C, KS) fp32 at tile64_offset
      static_assert(C * KS * sizeof(float) <= kGateStage * sizeof(Elem), "sD ends where the gates are staged");
      CUTE_UNROLL
      for (int u = 0; u < kPairs; ++u) *reinterpret_cast<float2*>(sD + tile64_offset(row_of(u), col_of(u))) = d[u];
      __syncthreads();
      float2 suffix[S];
      {
        float2 run = make_float2(0.f, 0.f);
        CUTE_UNROLL
        for (int i = S - 1; i >= 0; --i) {
          const float2 x = *reinterpret_cast<const float2*>(sD + tile64_offset(r_w + i, cp));
          run = make_float2(run.x + x.x, run.y + x.y);
          suffix[i] = run;
        }
        *reinterpret_cast<float2*>(sWT + warp * KS + cp) = run;   // the total of this warp's rows
      }
      __syncthreads();
      // exp(G_last) rowsum(h_c * L_{c+1}) + the chunk's k dk_inter + the later warps' d
      const float2 decay = exp2_diff(g_at(C - 1, cp), make_float2(0.f, 0.f));
      float2 later = make_float2(decay.x * next.x, decay.y * next.y);
      CUTE_UNROLL
      for (int w = 0; w < 4; ++w) {
        const float2 e = *reinterpret_cast<const float2*>(sWE + w * KS + cp);
        later = make_float2(later.x + e.x, later.y + e.y);
        if (w > warp) {
          const float2 t = *reinterpret_cast<const float2*>(sWT + w * KS + cp);
          later = make_float2(later.x + t.x, later.y + t.y);
        }
      }
      const int half = r_w / (C / 2), shift = r_w % (C / 2);
      const uint32_t clamp0 = sClamp[half * KS + cp] >> shift, clamp1 = sClamp[half * KS + cp + 1] >> shift;
      auto store_dg = [&](auto* dg) {   // fp32 or Elem, as g
        auto* at = dg + out0 + r_w * row_stride + cp;
        CUTE_UNROLL
        for (int i = 0; i < S; ++i, at += row_stride) {
          if (r_w + i < rows) {   // clamped gates: no gradient
            const float x0 = clamp0 & (1u << i) ? 0.f : suffix[i].x + later.x;
            const float x1 = clamp1 & (1u << i) ? 0.f : suffix[i].y + later.y;
            if constexpr (std::is_same_v<std::remove_pointer_t<decltype(at)>, float>)
              *reinterpret_cast<float2*>(at) = make_float2(x0, x1);
            else
              *reinterpret_cast<uint32_t*>(at) = elem_pair(x0, x1);
          }
        }
      };
      if (p.g_fp32)
        store_dg(static_cast<float*>(p.dg));
      else
        store_dg(static_cast<Elem*>(p.dg));
    };
    if (exact)
      slice(std::true_type{});
    else
      slice(std::false_type{});
    __syncthreads();   // the slice's buffers are rewritten next
  }
}

}  // namespace chunk

template <typename Elem>
void run_gla_bwd_intra(const GlaBwdIntraParams& p, cudaStream_t stream) {
  using Tr = chunk::BwdIntraTraits<Elem>;
  chunk::launch_per_chunk(chunk::gla_bwd_intra_kernel<Elem>, Tr::kThreads, Tr::kSmemBytes, p, stream);
}

}  // namespace fla
