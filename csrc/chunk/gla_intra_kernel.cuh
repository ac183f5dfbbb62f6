// gla_intra (math in gla.h): one thread block = one (chunk, head); 4 warps, warp w owns the
// query sub-chunk w (rows 16w..16w+15) of the products. The key dim is walked in slices of
// 64 columns:
//
//   gates, q, k of the slice into registers -> cumulative gates G (log2 units, in shared
//   memory) -> per thread, from its registers (one row of each sub-chunk, 8 columns): q~, k~
//   out, and the folds as 16-byte stores: Q_f at the row's sub-chunk start, the K_f copies of
//   the later sub-chunks, and the diagonal block's operands split into bf16 hi + lo parts
//   -> S_w += Q_f K_f^T (off-diagonal) and D_w += Qh Kh^T + Qh Kl^T + Ql Kh^T (diagonal,
//   about 16 mantissa bits: fp32-grade, as FLA's elementwise diagonal) on tensor cores; a
//   slice whose gates decay too strongly to fold adds its diagonal block pair by pair in fp32
//   to the same accumulators
//
// then A = scale * (S + D), zero above the diagonal, goes out through shared memory. No raw
// q, k in shared memory and no loads a slice ahead: three blocks fit one SM (64 KB, <= 168
// registers), and the other blocks cover each one's loads (the next slice's gates loaded
// during the products spilled and gained nothing: 152.8 against 153.1 us).
#pragma once
#include "chunk/chunk_kernel.cuh"
#include "chunk/chunk_loc.cuh"
#include "chunk/gla.h"

namespace fla {
namespace chunk {

// Strongest sub-chunk gate sum (16 positions, log2 units) folded into the diagonal block's
// operands: K_d grows up to 2^-span. bf16 has fp32's range (2^86 leaves room for |k|); fp16
// ends at 65504, so there 2^8.
template <typename Elem> CUTE_HOST_DEVICE constexpr float max_fold_span2() {
  return std::is_same_v<Elem, cute::half_t> ? 8.f : 60.f * kLog2e;
}

// gla_intra's place of gate column c in its sG row: the two float4 of each 8-column group
// trade places in the row's second half. A thread reads its 8 columns as two float4; without
// the swap the groups 32 floats apart (threads t and t + 4 of a row) hit the same banks.
CUTE_HOST_DEVICE constexpr int gate_col_swizzle(int c) { return c ^ ((c >> 5 & 1) << 2); }

// Raw gates of rows row0..row0+R-1 of one column (zeros past `rows`), fp32 or Elem in memory.
// Whole runs take the unguarded path: one add per load instead of a branch and an index.
template <int R, typename T>
__device__ __forceinline__ void load_gate_run(float (&rg)[R], const T* gp, int64_t row_stride, int valid) {
  if (valid >= R) {
    CUTE_UNROLL
    for (int i = 0; i < R; ++i) rg[i] = static_cast<float>(gp[i * row_stride]);
  } else {
    CUTE_UNROLL
    for (int i = 0; i < R; ++i) rg[i] = i < valid ? static_cast<float>(gp[i * row_stride]) : 0.f;
  }
}
template <typename Elem, int R>
__device__ __forceinline__ void load_gate_rows(float (&rg)[R], const void* g, bool g_fp32, int64_t off,
                                               int64_t row_stride, int row0, int rows) {
  if (g_fp32)
    load_gate_run(rg, static_cast<const float*>(g) + off + row0 * row_stride, row_stride, rows - row0);
  else
    load_gate_run(rg, static_cast<const Elem*>(g) + off + row0 * row_stride, row_stride, rows - row0);
}

// In place: clamped raw gates -> their running sums in log2 units (the forward and the
// backward must see the same G).
template <int R>
__device__ __forceinline__ void scan_gate_rows(float (&rg)[R]) {
  rg[0] = fmaxf(rg[0], kMinLogGate) * kLog2e;
  CUTE_UNROLL
  for (int i = 1; i < R; ++i) rg[i] = rg[i - 1] + fmaxf(rg[i], kMinLogGate) * kLog2e;
}

// One slice's gate step, shared by gla_intra and gla_bwd_intra: each thread holds the raw
// gates of rows grow0.. grow0 + C/2 - 1 of column gcol (the column's half `ghalf`); they
// become running sums over the chunk (log2 units) in sG (rows `ldg` floats apart), with the
// first half's totals passed through sTot; the column sits at `scol` of its sG row (a swizzled
// place where the readers want one). Returns, to every thread, whether some 16-row
// sub-chunk of the slice decays too strongly to fold its diagonal block (then the slice
// takes the exact variant). Ends with a barrier: G and what was stored before it are visible.
template <typename Elem, int KS, int R>
__device__ __forceinline__ bool scan_slice_gates(float (&rg)[R], float* sTot, float* sG, int ldg, int ghalf,
                                                 int gcol, int grow0, int scol) {
  constexpr int S = 16;
  static_assert(R == 2 * S, "a half chunk of two sub-chunks per thread");
  scan_gate_rows(rg);
  const bool strong = rg[S - 1] - rg[0] < -max_fold_span2<Elem>() || rg[2 * S - 1] - rg[S] < -max_fold_span2<Elem>();
  sTot[ghalf * KS + gcol] = rg[R - 1];
  __syncthreads();
  const float base = ghalf > 0 ? sTot[gcol] : 0.f;
  CUTE_UNROLL
  for (int i = 0; i < R; ++i) sG[(grow0 + i) * ldg + scol] = rg[i] + base;
  return __syncthreads_or(strong);
}

template <typename Elem_, int DK_>
struct IntraTraits {
  using Elem = typename CuteType<Elem_>::type;
  static constexpr int C = kChunk, DK = DK_, KS = 64, S = 16, kThreads = 128;
  static_assert(DK % KS == 0 && C == 4 * S, "a warp per query sub-chunk, whole slices");
  using TiledMma = typename Traits<Elem_, 64>::TiledMma;   // 4 warps along M
  using LdsmN = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;
  using LayoutF = SmemTile<C, KS>;    // operands (C, KS); at the end the score tile (C, C)
  // K_f of warps 1..3 (rows 0..16w-1 folded at row 16w) overlap: warp w's copy starts at row
  // base(w) = 0, 16, 48 and only its first 16w rows are read unmasked (112 rows in all).
  static constexpr int kKfRows = 112;
  static constexpr int kBlocksPerSm = 3;
  // fp32: cumulative gates [C][KS], half totals [2][KS]; Elem: Qh, Ql, Kh, Kl (C, KS), the
  // K_f copies (kKfRows, KS)
  static constexpr int kSmemBytes = (C * KS + 2 * KS) * 4 + (4 * C + kKfRows) * KS * int(sizeof(Elem));
  static_assert(kSmemBytes * kBlocksPerSm <= 227 * 1024, "three blocks per SM");
};

template <typename Elem_, int DK>
__global__ void __launch_bounds__(128, IntraTraits<Elem_, DK>::kBlocksPerSm) gla_intra_kernel(const __grid_constant__ GlaIntraParams p) {
  using Tr = IntraTraits<Elem_, DK>;
  using Elem = typename Tr::Elem;
  using Vec = cute::uint128_t;
  using Layout16 = SmemTile<16, Tr::KS>;
  constexpr int C = Tr::C, KS = Tr::KS, S = Tr::S, kThreads = Tr::kThreads;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* const sG = reinterpret_cast<float*>(smem_raw);        // [C][KS] cumulative gates, log2 units
  float* const sTot = sG + C * KS;                             // [2][KS] gate totals of the two halves
  Elem* const sQh = reinterpret_cast<Elem*>(sTot + 2 * KS);    // (C, KS) swizzled: Q_f, later A
  Elem* const sQl = sQh + C * KS;
  Elem* const sKh = sQl + C * KS;
  Elem* const sKl = sKh + C * KS;
  Elem* const sKf = sKl + C * KS;                              // (kKfRows, KS) swizzled

  const int slot = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t H = p.H;
  ChunkLoc loc;
  if (!locate_chunk(slot, p.cu_seqlens, p.chunk_offsets, p.N, p.T, loc)) return;
  const int64_t t0 = loc.bos + loc.c * C;                          // the chunk's first token
  const int rows = int(min(int64_t(C), loc.len - loc.c * C));      // rows past it are zeros, gates 0
  const int64_t row_stride = H * DK;
  const int64_t head_off = (t0 * H + h) * DK;              // element (row 0, column 0) of the chunk

  // Loads of one slice into registers: thread tid moves q/k vectors (row u / 8, columns
  // u % 8 * 8) for u = tid + 128 m, and the gates of column tid % KS, rows half*32 .. +31.
  constexpr int kVecs = C * KS / 8 / kThreads;
  const int gcol = tid % KS, ghalf = tid / KS, grow0 = ghalf * (C / 2);
  Vec rq[kVecs], rk[kVecs];
  float rg[C / 2];
  auto load_slice = [&](int col0) {
    // the gates first: the scan waits on them before anything else
    load_gate_rows<Elem>(rg, p.g, p.g_fp32, head_off + col0 + gcol, row_stride, grow0, rows);
    const Elem* q = static_cast<const Elem*>(p.q) + head_off + col0;
    const Elem* k = static_cast<const Elem*>(p.k) + head_off + col0;
    CUTE_UNROLL
    for (int m = 0; m < kVecs; ++m) {
      const int u = tid + kThreads * m, r = u / (KS / 8), cc = u % (KS / 8) * 8;
      rq[m] = rk[m] = Vec{};
      if (r < rows) {
        rq[m] = *reinterpret_cast<const Vec*>(q + r * row_stride + cc);
        rk[m] = *reinterpret_cast<const Vec*>(k + r * row_stride + cc);
      }
    }
  };

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  Tensor accS = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});      // (MMA, MMA_M, MMA_N) off-diagonal
  Tensor accD = partition_fragment_C(mma, Shape<Int<C>, Int<S>>{});      // (MMA, MMA_M, MMA_N) diagonal block
  clear(accS);
  clear(accD);
  Tensor tDcD = thr_mma.partition_C(make_identity_tensor(Shape<Int<C>, Int<S>>{}));   // (row, column - r_ref)
  CUTE_STATIC_ASSERT_V(size(tDcD) == size(accD));
  const int r_ref = warp * S;                                  // this warp's reference row
  const int di = lane / 2, dj0 = lane % 2 * 8;
  Tensor sQhT = make_tensor(make_smem_ptr(sQh), typename Tr::LayoutF{});              // (C, KS)
  Tensor sQlT = make_tensor(make_smem_ptr(sQl), typename Tr::LayoutF{});              // (C, KS)
  Tensor sKhT = make_tensor(make_smem_ptr(sKh), typename Tr::LayoutF{});              // (C, KS)
  Tensor sKlT = make_tensor(make_smem_ptr(sKl), typename Tr::LayoutF{});              // (C, KS)
  Tensor sKhW = make_tensor(make_smem_ptr(sKh + r_ref * KS), Layout16{});             // (S, KS) this warp's rows
  Tensor sKlW = make_tensor(make_smem_ptr(sKl + r_ref * KS), Layout16{});             // (S, KS)
  Tensor sKfAll = make_tensor(make_smem_ptr(sKf), SmemTile<Tr::kKfRows, KS>{});       // (kKfRows, KS)
  const int kf_base = warp == 3 ? 48 : (warp == 2 ? 16 : 0);
  Tensor sKfW = make_tensor(make_smem_ptr(sKf + kf_base * KS), typename Tr::LayoutF{});  // (C, KS), rows < r_ref read

  for (int col0 = 0; col0 < DK; col0 += KS) {
    // 1. the slice's gates, q and k into registers; cumulative gates (log2 units) to sG
    load_slice(col0);
    const bool exact = scan_slice_gates<Elem, KS>(rg, sTot, sG, KS, ghalf, gcol, grow0,
                                                  gate_col_swizzle(gcol));   // and: G visible

    // 2. per row of this thread (row r of sub-chunk m, columns cc..cc+7): q~ and k~ out; the
    // folds at the sub-chunk's first row r_m: Q_f (hi + lo), the diagonal block's K (hi + lo,
    // grows as 2^(G_m - G_r): bounded unless `exact`), and K_f at each later sub-chunk's
    // first row (<= 1) for the warps that own those query rows
    {
      Elem* q_gated = static_cast<Elem*>(p.q_gated) + head_off + col0;
      Elem* k_gated = static_cast<Elem*>(p.k_gated) + head_off + col0;
      auto g8 = [&](int r, int cc, float (&g)[8]) {
        *reinterpret_cast<float4*>(g) = *reinterpret_cast<const float4*>(sG + r * KS + gate_col_swizzle(cc));
        *reinterpret_cast<float4*>(g + 4) = *reinterpret_cast<const float4*>(sG + r * KS + gate_col_swizzle(cc + 4));
      };
      // 8 products x * 2^(e) to the input type, 16 bytes to `hi_dst`; with `lo_dst`, what that
      // rounding dropped as well
      auto fold8 = [&](const float (&x)[8], const float (&e)[8], Elem* hi_dst, Elem* lo_dst, bool global = false) {
        uint32_t hi[4], lo[4];
        CUTE_UNROLL
        for (int j = 0; j < 4; ++j) {
          const float f0 = x[2 * j] * exp2_ftz(e[2 * j]), f1 = x[2 * j + 1] * exp2_ftz(e[2 * j + 1]);
          hi[j] = pack_pair<Elem>(f0, f1);
          if (lo_dst != nullptr) {
            const float2 r = unpack_pair<Elem>(hi[j]);
            lo[j] = pack_pair<Elem>(f0 - r.x, f1 - r.y);
          }
        }
        if (global)   // one 16-byte store: a uint4 assignment to global memory compiles to four 4-byte ones
          __stwb(reinterpret_cast<uint4*>(hi_dst), make_uint4(hi[0], hi[1], hi[2], hi[3]));
        else
          *reinterpret_cast<uint4*>(hi_dst) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
        if (lo_dst != nullptr) *reinterpret_cast<uint4*>(lo_dst) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
      };
      auto unpack8 = [&](const Vec& v, float (&x)[8]) {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(&v);
        CUTE_UNROLL
        for (int j = 0; j < 4; ++j) {
          const float2 f = unpack_pair<Elem>(w[j]);
          x[2 * j] = f.x;
          x[2 * j + 1] = f.y;
        }
      };
      float gl[8];
      g8(C - 1, tid % (KS / 8) * 8, gl);
      CUTE_UNROLL
      for (int m = 0; m < kVecs; ++m) {
        const int u = tid + kThreads * m, r = u / (KS / 8), cc = u % (KS / 8) * 8;   // r / S == m
        static_assert(kThreads / (KS / 8) == S, "one row of every sub-chunk per thread");
        float xq[8], xk[8], gr[8], gm[8], e[8];
        unpack8(rq[m], xq);
        unpack8(rk[m], xk);
        g8(r, cc, gr);
        g8(m * S, cc, gm);
        if (r < rows) {
          fold8(xq, gr, q_gated + r * row_stride + cc, nullptr, true);
          CUTE_UNROLL
          for (int i = 0; i < 8; ++i) e[i] = gl[i] - gr[i];
          fold8(xk, e, k_gated + r * row_stride + cc, nullptr, true);
        }
        CUTE_UNROLL
        for (int i = 0; i < 8; ++i) e[i] = gr[i] - gm[i];
        fold8(xq, e, &sQhT(r, cc), &sQlT(r, cc));
        if (!exact) {
          CUTE_UNROLL
          for (int i = 0; i < 8; ++i) e[i] = gm[i] - gr[i];
          fold8(xk, e, &sKhT(r, cc), &sKlT(r, cc));
        }
        CUTE_UNROLL
        for (int a = m + 1; a < 4; ++a) {   // K_f copy of warp a: key row r at physical row base(a) + r
          constexpr int kBase[4] = {0, 0, 16, 48};
          g8(a * S, cc, gm);
          CUTE_UNROLL
          for (int i = 0; i < 8; ++i) e[i] = gm[i] - gr[i];
          fold8(xk, e, &sKfAll(kBase[a] + r, cc), nullptr);
        }
      }
      if (tid < KS) p.key_decay[(int64_t(slot) * H + h) * DK + col0 + tid] = exp2_ftz(sG[(C - 1) * KS + gate_col_swizzle(tid)]);
    }
    __syncthreads();                             // every fold is visible

    // 4. tensor cores: off-diagonal blocks (warp 0 has none), then the diagonal block
    if (warp > 0) gemm_ss<Tr>(accS, sQhT, sKfW, typename Tr::LdsmN{}, typename Tr::LdsmN{}, tid);
    if (!exact) {
      gemm_ss<Tr>(accD, sQhT, sKhW, typename Tr::LdsmN{}, typename Tr::LdsmN{}, tid);
      gemm_ss<Tr>(accD, sQhT, sKlW, typename Tr::LdsmN{}, typename Tr::LdsmN{}, tid);
      gemm_ss<Tr>(accD, sQlT, sKhW, typename Tr::LdsmN{}, typename Tr::LdsmN{}, tid);
    } else {   // into the same accumulators, pair by pair in fp32: 2^(G_i - G_j) <= 1 for
               // j <= i; raw q, k from global memory (L1 / L2: just read), rows past the
               // sequence as zeros
      const Elem* q = static_cast<const Elem*>(p.q) + head_off + col0;
      const Elem* k = static_cast<const Elem*>(p.k) + head_off + col0;
      for (int e = 0; e < KS; ++e) {
        const int es = gate_col_swizzle(e);
        CUTE_UNROLL
        for (int i = 0; i < size(accD); ++i) {
          const int ri = get<0>(tDcD(i)), rj = r_ref + get<1>(tDcD(i));   // pairs above the diagonal are dropped later
          const float qv = ri < rows ? static_cast<float>(q[ri * row_stride + e]) : 0.f;
          const float kv = rj < rows ? static_cast<float>(k[rj * row_stride + e]) : 0.f;
          accD(i) += qv * kv * exp2_ftz(fminf(sG[ri * KS + es] - sG[rj * KS + es], 0.f));
        }
      }
    }
    __syncthreads();                             // the slice's buffers are rewritten next
  }

  // 5. A = scale * scores, zero above the diagonal, out through the Qh tile: the off-diagonal
  // part strictly left of this warp's sub-chunk, then the diagonal block (its two fp32 parts
  // meet in this warp's 16 x 16 scratch of the gate buffer)
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));
  CUTE_STATIC_ASSERT_V(size(tScS) == size(accS));
  CUTE_UNROLL
  for (int i = 0; i < size(accS); ++i) accS(i) = get<1>(tScS(i)) < r_ref ? accS(i) * p.scale : 0.f;
  Tensor tSsA = thr_mma.partition_C(sQhT);
  store_pairs(accS, tSsA);
  float* scratch = sG + warp * S * S;                       // [S][S]
  CUTE_UNROLL
  for (int i = 0; i < size(accD); ++i) scratch[(get<0>(tDcD(i)) - r_ref) * S + get<1>(tDcD(i))] = accD(i);
  __syncwarp();
  float diag[8];
  CUTE_UNROLL
  for (int jj = 0; jj < 8; ++jj) {
    const float x = scratch[di * S + dj0 + jj];
    diag[jj] = dj0 + jj <= di ? x * p.scale : 0.f;
    sQhT(r_ref + di, r_ref + dj0 + jj) = static_cast<Elem>(diag[jj]);
  }
  auto copy_out = [&](void* dst) {   // this warp's rows of the staged tile
    __syncwarp();
    Elem* A = static_cast<Elem*>(dst);
    CUTE_UNROLL
    for (int j = 0; j < S * C / 8 / 32; ++j) {
      const int u = lane + 32 * j, r = r_ref + u / (C / 8), cc = u % (C / 8) * 8;
      if (r < rows) *reinterpret_cast<Vec*>(A + ((t0 + r) * H + h) * C + cc) = *reinterpret_cast<const Vec*>(&sQhT(r, cc));
    }
    __syncwarp();
  };
  copy_out(p.A);
  if (p.A_lo != nullptr) {   // what the input dtype dropped: A = A_hi + A_lo to about 16 bits (backward)
    CUTE_UNROLL
    for (int i = 0; i < size(accS); ++i) accS(i) -= static_cast<float>(static_cast<Elem>(accS(i)));
    store_pairs(accS, tSsA);
    __syncwarp();   // the diagonal block's zeros above, then its values by other lanes (racecheck)
    CUTE_UNROLL
    for (int jj = 0; jj < 8; ++jj)
      sQhT(r_ref + di, r_ref + dj0 + jj) = static_cast<Elem>(diag[jj] - static_cast<float>(static_cast<Elem>(diag[jj])));
    copy_out(p.A_lo);
  }
}

}  // namespace chunk

namespace chunk {
// One block of `threads` per (chunk slot, head), as gla_intra and gla_bwd_intra run.
template <typename Kernel, typename Params>
void launch_per_chunk(Kernel kernel, int threads, int smem_bytes, const Params& p, cudaStream_t stream) {
  FLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  const dim3 grid(p.slots, p.H);
  if (grid.x * grid.y == 0) return;
  kernel<<<grid, threads, smem_bytes, stream>>>(p);
  FLA_CHECK_LAUNCH();
}
}  // namespace chunk

template <typename Elem, int DK>
void run_gla_intra(const GlaIntraParams& p, cudaStream_t stream) {
  using Tr = chunk::IntraTraits<Elem, DK>;
  chunk::launch_per_chunk(chunk::gla_intra_kernel<Elem, DK>, Tr::kThreads, Tr::kSmemBytes, p, stream);
}

}  // namespace fla
