// gla_intra (math in gla.h): one thread block = one (chunk, head); 4 warps, warp w owns the
// query sub-chunk w (rows 16w..16w+15). The key dim is walked in slices of 64 columns:
//
//   load the slice's gates, q, k -> cumulative gates G -> fold Q_f (each warp its own rows)
//   and K_f (each warp its own copy, folded at its own reference row) -> S_w += Q_f K_f^T on
//   tensor cores -> write q~, k~ and exp(G_last) of the slice
//
// then A = scale * S, masked to j <= i, goes out through shared memory in 16-byte rows.
#pragma once
#include "chunk/chunk_kernel.cuh"
#include "chunk/gla.h"

namespace fla {
namespace chunk {

// Strongest sub-chunk gate sum (16 positions) folded into an fp32 operand of the diagonal
// block: K_d grows up to exp(-span), and fp32 ends near exp(88).
constexpr float kMaxFoldSpan = 60.f;

template <typename Elem_, int DK_>
struct IntraTraits {
  using Elem = typename CuteType<Elem_>::type;
  static constexpr int C = kChunk, DK = DK_, KS = 64, S = 16, kThreads = 128;
  static constexpr int KSP = KS + 4;   // padded fp32 rows: 16 rows read at one column hit 8 bank groups
  static_assert(DK % KS == 0 && C == 4 * S, "a warp per query sub-chunk, whole slices");
  using TiledMma = typename Traits<Elem_, 64>::TiledMma;   // 4 warps along M
  using LdsmN = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;
  using LayoutF = SmemTile<C, KS>;    // bf16 operands (C, KS); at the end the score tile (C, C)
  // K_f of warps 1..3 (rows 0..16w-1 folded at row 16w) overlap: warp w's copy starts at row
  // base(w) = 0, 16, 48 and only its first 16w rows are read unmasked (112 rows in all).
  static constexpr int kKfRows = 112;
  // fp32: cumulative gates [C][KS], Q_d and K_d [C][KSP], half totals [2][KS];
  // Elem: raw q, k [C][KS], Q_f (C, KS), the K_f copies (kKfRows, KS)
  static constexpr int kSmemBytes = (C * KS + 2 * C * KSP + 2 * KS) * 4 + (3 * C + kKfRows) * KS * int(sizeof(Elem));
};

template <typename Elem_, int DK>
__global__ void __launch_bounds__(128) gla_intra_kernel(const __grid_constant__ GlaIntraParams p) {
  using Tr = IntraTraits<Elem_, DK>;
  using Elem = typename Tr::Elem;
  using Vec = cute::uint128_t;
  constexpr int C = Tr::C, KS = Tr::KS, KSP = Tr::KSP, S = Tr::S, kThreads = Tr::kThreads;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* const sG = reinterpret_cast<float*>(smem_raw);        // [C][KS] cumulative gates
  float* const sQd = sG + C * KS;                              // [C][KSP] Q folded at the warp's row, fp32
  float* const sKd = sQd + C * KSP;                            // [C][KSP] K of the warp's rows, same fold
  float* const sTot = sKd + C * KSP;                           // [2][KS] gate totals of the two halves
  Elem* const sQ = reinterpret_cast<Elem*>(sTot + 2 * KS);     // [C][KS] row-major
  Elem* const sK = sQ + C * KS;                                // [C][KS] row-major
  Elem* const sQf = sK + C * KS;                               // (C, KS) swizzled
  Elem* const sKf = sQf + C * KS;                              // (kKfRows, KS) swizzled

  const int slot = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t H = p.H;
  int64_t bos, len, c;
  if (p.cu_seqlens != nullptr) {   // the sequence holding this slot: chunk_offsets[n] <= slot < [n + 1]
    if (slot >= p.chunk_offsets[p.N]) return;
    int lo = 0, hi = p.N;
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (p.chunk_offsets[mid] <= slot) lo = mid; else hi = mid;
    }
    bos = p.cu_seqlens[lo];
    len = p.cu_seqlens[lo + 1] - bos;
    c = slot - p.chunk_offsets[lo];
  } else {
    const int64_t chunks = (p.T + C - 1) / C;
    bos = slot / chunks * p.T;
    len = p.T;
    c = slot % chunks;
  }
  const int64_t t0 = bos + c * C;                          // the chunk's first token
  const int rows = int(min(int64_t(C), len - c * C));      // rows past it are zeros, gates 0
  auto row_off = [&](int r) { return ((t0 + r) * H + h) * DK; };

  // Loads of one slice into registers: thread tid moves q/k vectors (row u / 8, columns u % 8 * 8)
  // for u = tid + 128 m, and the gates of column tid % KS, rows half * 32 .. half * 32 + 31.
  constexpr int kVecs = C * KS / 8 / kThreads;
  const int gcol = tid % KS, ghalf = tid / KS, grow0 = ghalf * (C / 2);
  Vec rq[kVecs], rk[kVecs];
  float rg[C / 2];
  auto load_slice = [&](int col0) {
    CUTE_UNROLL
    for (int m = 0; m < kVecs; ++m) {
      const int u = tid + kThreads * m, r = u / (KS / 8), cc = u % (KS / 8) * 8;
      rq[m] = rk[m] = Vec{};
      if (r < rows) {
        rq[m] = *reinterpret_cast<const Vec*>(static_cast<const Elem*>(p.q) + row_off(r) + col0 + cc);
        rk[m] = *reinterpret_cast<const Vec*>(static_cast<const Elem*>(p.k) + row_off(r) + col0 + cc);
      }
    }
    CUTE_UNROLL
    for (int i = 0; i < C / 2; ++i) {
      const int r = grow0 + i;
      float x = 0.f;
      if (r < rows) {
        const int64_t off = row_off(r) + col0 + gcol;
        x = p.g_fp32 ? static_cast<const float*>(p.g)[off] : static_cast<float>(static_cast<const Elem*>(p.g)[off]);
      }
      rg[i] = fmaxf(x, kMinLogGate);
    }
  };

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  Tensor accS = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});      // (MMA, MMA_M, MMA_N)
  clear(accS);
  // the diagonal block in fp32: lane holds row r_ref + lane / 2, columns r_ref + (lane % 2) * 8 + jj
  float acc_d[8];
  CUTE_UNROLL
  for (int jj = 0; jj < 8; ++jj) acc_d[jj] = 0.f;
  const int r_ref = warp * S;                                  // this warp's reference row
  const int di = lane / 2, dj0 = lane % 2 * 8;
  Tensor sQfT = make_tensor(make_smem_ptr(sQf), typename Tr::LayoutF{});             // (C, KS)
  const int kf_base = warp == 3 ? 48 : (warp == 2 ? 16 : 0);
  Tensor sKfT = make_tensor(make_smem_ptr(sKf + kf_base * KS), typename Tr::LayoutF{});   // (C, KS), rows < r_ref read

  load_slice(0);
  for (int col0 = 0; col0 < DK; col0 += KS) {
    // 1. raw q, k to shared memory; cumulative gates of each half-column in registers
    CUTE_UNROLL
    for (int m = 0; m < kVecs; ++m) {
      const int u = tid + kThreads * m, r = u / (KS / 8), cc = u % (KS / 8) * 8;
      *reinterpret_cast<Vec*>(sQ + r * KS + cc) = rq[m];
      *reinterpret_cast<Vec*>(sK + r * KS + cc) = rk[m];
    }
    CUTE_UNROLL
    for (int i = 1; i < C / 2; ++i) rg[i] += rg[i - 1];
    // does a sub-chunk of this half decay too strongly to fold its diagonal block in fp32?
    const bool strong = rg[S - 1] - rg[0] < -kMaxFoldSpan || rg[2 * S - 1] - rg[S] < -kMaxFoldSpan;
    sTot[ghalf * KS + gcol] = rg[C / 2 - 1];
    __syncthreads();
    const float base = ghalf > 0 ? sTot[gcol] : 0.f;
    CUTE_UNROLL
    for (int i = 0; i < C / 2; ++i) sG[(grow0 + i) * KS + gcol] = rg[i] + base;
    const bool exact_diag = __syncthreads_or(strong);   // and: G, q, k of the slice are visible

    // 2. gated q and k for the pass, and exp(G_last) of the slice
    {
      Elem* q_gated = static_cast<Elem*>(p.q_gated);
      Elem* k_gated = static_cast<Elem*>(p.k_gated);
      CUTE_UNROLL
      for (int m = 0; m < kVecs; ++m) {
        const int u = tid + kThreads * m, r = u / (KS / 8), cc = u % (KS / 8) * 8;
        if (r < rows) {
          cute::array<Elem, 8> xq, xk;
          *reinterpret_cast<Vec*>(xq.data()) = rq[m];
          *reinterpret_cast<Vec*>(xk.data()) = rk[m];
          float gr[8], gl[8];
          *reinterpret_cast<float4*>(gr) = *reinterpret_cast<const float4*>(sG + r * KS + cc);
          *reinterpret_cast<float4*>(gr + 4) = *reinterpret_cast<const float4*>(sG + r * KS + cc + 4);
          *reinterpret_cast<float4*>(gl) = *reinterpret_cast<const float4*>(sG + (C - 1) * KS + cc);
          *reinterpret_cast<float4*>(gl + 4) = *reinterpret_cast<const float4*>(sG + (C - 1) * KS + cc + 4);
          CUTE_UNROLL
          for (int e = 0; e < 8; ++e) {
            xq[e] = static_cast<Elem>(static_cast<float>(xq[e]) * __expf(gr[e]));
            xk[e] = static_cast<Elem>(static_cast<float>(xk[e]) * __expf(gl[e] - gr[e]));
          }
          *reinterpret_cast<Vec*>(q_gated + row_off(r) + col0 + cc) = *reinterpret_cast<const Vec*>(xq.data());
          *reinterpret_cast<Vec*>(k_gated + row_off(r) + col0 + cc) = *reinterpret_cast<const Vec*>(xk.data());
        }
      }
      if (tid < KS) p.key_decay[(int64_t(slot) * H + h) * DK + col0 + tid] = __expf(sG[(C - 1) * KS + tid]);
    }
    // 3. folds. Q at the warp's row (fp32 for the diagonal block, Elem for the MMA), K of the
    // warp's own rows (fp32); then the K_f copies of warps 1..3 by all threads.
    {
      const int cc = 2 * lane;
      const float2 g_ref = *reinterpret_cast<const float2*>(sG + r_ref * KS + cc);
      CUTE_UNROLL
      for (int i = r_ref; i < r_ref + S; ++i) {
        const float2 gi = *reinterpret_cast<const float2*>(sG + i * KS + cc);
        cute::array<Elem, 2> xq, xk, fq;
        *reinterpret_cast<uint32_t*>(xq.data()) = *reinterpret_cast<const uint32_t*>(sQ + i * KS + cc);
        *reinterpret_cast<uint32_t*>(xk.data()) = *reinterpret_cast<const uint32_t*>(sK + i * KS + cc);
        const float2 qd = make_float2(static_cast<float>(xq[0]) * __expf(gi.x - g_ref.x),
                                      static_cast<float>(xq[1]) * __expf(gi.y - g_ref.y));
        const float2 kd = make_float2(static_cast<float>(xk[0]) * __expf(g_ref.x - gi.x),
                                      static_cast<float>(xk[1]) * __expf(g_ref.y - gi.y));
        *reinterpret_cast<float2*>(sQd + i * KSP + cc) = qd;
        *reinterpret_cast<float2*>(sKd + i * KSP + cc) = kd;
        fq[0] = static_cast<Elem>(qd.x);
        fq[1] = static_cast<Elem>(qd.y);
        *reinterpret_cast<uint32_t*>(&sQfT(i, cc)) = *reinterpret_cast<const uint32_t*>(fq.data());
      }
      // K_f: physical row pr of the copies is key row j of warp w's copy (pr = base(w) + j)
      Tensor sKfAll = make_tensor(make_smem_ptr(sKf), SmemTile<Tr::kKfRows, KS>{});   // (kKfRows, KS)
      constexpr int kPairs = 96 * KS / 2;
#pragma unroll 4
      for (int m = 0; m < kPairs / kThreads; ++m) {
        const int f = tid + kThreads * m, pc = 2 * (f % (KS / 2)), pr = f / (KS / 2);
        const int w = pr < 16 ? 1 : (pr < 48 ? 2 : 3), j = pr - (w == 1 ? 0 : (w == 2 ? 16 : 48));
        const float2 gr = *reinterpret_cast<const float2*>(sG + w * S * KS + pc);
        const float2 gj = *reinterpret_cast<const float2*>(sG + j * KS + pc);
        cute::array<Elem, 2> x;
        *reinterpret_cast<uint32_t*>(x.data()) = *reinterpret_cast<const uint32_t*>(sK + j * KS + pc);
        x[0] = static_cast<Elem>(static_cast<float>(x[0]) * __expf(gr.x - gj.x));
        x[1] = static_cast<Elem>(static_cast<float>(x[1]) * __expf(gr.y - gj.y));
        *reinterpret_cast<uint32_t*>(&sKfAll(pr, pc)) = *reinterpret_cast<const uint32_t*>(x.data());
      }
    }

    __syncthreads();                         // every fold is visible
    if (col0 + KS < DK) load_slice(col0 + KS);   // the next slice's loads fly during the products

    // 4. off-diagonal blocks on tensor cores (warp 0 has none)
    if (warp > 0) gemm_ss<Tr>(accS, sQfT, sKfT, typename Tr::LdsmN{}, typename Tr::LdsmN{}, tid);
    // 5. the diagonal block in fp32: folded operands, or pair by pair where a span is too strong
    if (!exact_diag) {
      const float* qrow = sQd + (r_ref + di) * KSP;
#pragma unroll 2
      for (int e = 0; e < KS; e += 4) {
        const float4 qv = *reinterpret_cast<const float4*>(qrow + e);
        CUTE_UNROLL
        for (int jj = 0; jj < 8; ++jj) {
          const float4 kv = *reinterpret_cast<const float4*>(sKd + (r_ref + dj0 + jj) * KSP + e);
          acc_d[jj] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
        }
      }
    } else {
      const int ri = r_ref + di;
      for (int e = 0; e < KS; ++e) {
        const float qv = static_cast<float>(sQ[ri * KS + e]), gi = sG[ri * KS + e];
        CUTE_UNROLL
        for (int jj = 0; jj < 8; ++jj) {
          const int rj = r_ref + dj0 + jj;
          // pairs above the diagonal are dropped later; keep their exponent from overflowing
          acc_d[jj] += qv * static_cast<float>(sK[rj * KS + e]) * __expf(fminf(gi - sG[rj * KS + e], 0.f));
        }
      }
    }
    __syncthreads();                         // the slice's buffers are rewritten next
  }

  // 6. A = scale * scores, zero above the diagonal, out through the Q_f tile: the MMA part
  // strictly below this warp's sub-chunk, then the diagonal block from fp32
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));
  CUTE_STATIC_ASSERT_V(size(tScS) == size(accS));
  CUTE_UNROLL
  for (int i = 0; i < size(accS); ++i) accS(i) = get<1>(tScS(i)) < r_ref ? accS(i) * p.scale : 0.f;
  Tensor tSsA = thr_mma.partition_C(sQfT);
  store_pairs(accS, tSsA);
  __syncwarp();
  CUTE_UNROLL
  for (int jj = 0; jj < 8; ++jj)
    sQfT(r_ref + di, r_ref + dj0 + jj) = static_cast<Elem>(dj0 + jj <= di ? acc_d[jj] * p.scale : 0.f);
  __syncwarp();
  Elem* A = static_cast<Elem*>(p.A);
  CUTE_UNROLL
  for (int j = 0; j < S * C / 8 / 32; ++j) {
    const int u = lane + 32 * j, r = r_ref + u / (C / 8), cc = u % (C / 8) * 8;
    if (r < rows) *reinterpret_cast<Vec*>(A + ((t0 + r) * H + h) * C + cc) = *reinterpret_cast<const Vec*>(&sQfT(r, cc));
  }
}

}  // namespace chunk

template <typename Elem, int DK>
void run_gla_intra(const GlaIntraParams& p, cudaStream_t stream) {
  using Tr = chunk::IntraTraits<Elem, DK>;
  auto kernel = chunk::gla_intra_kernel<Elem, DK>;
  FLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
  const dim3 grid(p.slots, p.H);
  if (grid.x * grid.y == 0) return;
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  FLA_CHECK_LAUNCH();
}

}  // namespace fla
