// gla_bwd_intra (math in gla.h): one thread block = one (chunk, head); 4 warps, warp w owns
// sub-chunk w (rows 16w..16w+15) of every output.
//
//   1. dA = scale * dO V^T, j <= i, on tensor cores over 64-column slices of V; the
//      off-diagonal part kept as bf16/fp16 hi + lo operands, the diagonal blocks in fp32
//   2. per 64-column slice of K: the gates G (the forward's scan, log2 units), then
//        dq_w += dA[w, b < w] K_f      K_f = K_b 2^(G_16w - G_b)        (<= 1)
//        dk_w += dA[a > w, w]^T Q_f    Q_f = Q_a 2^(G_a - G_16w+15)     (<= 1)
//      on tensor cores (each warp its own fold copy and k-block range), the diagonal block
//      pair by pair in fp32, and the gated inter-chunk parts P, R added in the epilogue
//   3. dg = (q dq - k dk summed to the chunk's end) + state_dots of the chunk, 0 where the
//      gate was clamped
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
  using LayoutF = SmemTile<C, KS>;     // (C, KS) slices
  using LayoutFt = SmemTileT<C, KS>;   // read as (KS, C)
  using LayoutA = SmemTile<C, C>;      // dA
  using LayoutAt = SmemTileT<C, C>;    // dA^T
  // fold copies: warp w's K_f rows j < 16w sit at kf_base(w) + j, its Q_f rows i >= 16(w+1)
  // at qf_base(w) + i; 96 rows each, no overlap
  static constexpr int kFoldRows = 96;
  static constexpr int LDF = KS + 8;   // fp32 scratch rows, padded against bank conflicts
  static constexpr int kElems = 2 * C * KS + 2 * kFoldRows * KS + 2 * C * C;
  static constexpr int kFloats = C * KS + C * LDF + 2 * KS + 4 * KS + 4 * S * (S + 1) + 2 * KS;
  static constexpr int kSmemBytes = kElems * int(sizeof(Elem)) + kFloats * 4;
  static_assert(C * LDF * 4 >= 2 * C * KS * int(sizeof(Elem)), "dO, V slices alias the fp32 scratch");
};

__device__ __forceinline__ int kf_base(int w) { return w == 3 ? 48 : (w == 2 ? 16 : 0); }
__device__ __forceinline__ int qf_base(int w) { return w == 0 ? -16 : (w == 1 ? 16 : 32); }

template <typename Elem_>
__global__ void __launch_bounds__(128) gla_bwd_intra_kernel(const __grid_constant__ GlaBwdIntraParams p) {
  using Tr = BwdIntraTraits<Elem_>;
  using Elem = typename Tr::Elem;
  using Vec = cute::uint128_t;
  constexpr int C = Tr::C, KS = Tr::KS, S = Tr::S, kThreads = Tr::kThreads, LDF = Tr::LDF;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Elem* const sQ = reinterpret_cast<Elem*>(smem_raw);       // [C][KS] row-major, raw q slice
  Elem* const sK = sQ + C * KS;                              // [C][KS] raw k slice
  Elem* const sKf = sK + C * KS;                             // (kFoldRows, KS) swizzled
  Elem* const sQf = sKf + Tr::kFoldRows * KS;                // (kFoldRows, KS) swizzled
  Elem* const sAh = sQf + Tr::kFoldRows * KS;                // (C, C) dA hi
  Elem* const sAl = sAh + C * C;                             // (C, C) dA lo
  float* const sG = reinterpret_cast<float*>(sAl + C * C);   // [C][KS] cumulative gates, log2 units
  float* const sBuf = sG + C * KS;                           // [C][LDF] accumulators of the slice
  float* const sTot = sBuf + C * LDF;                        // [2][KS] gate totals of the two halves
  float* const sWT = sTot + 2 * KS;                          // [4][KS] per-warp sums of d
  float* const sAd = sWT + 4 * KS;                           // [4][S][S+1] diagonal blocks of dA
  uint32_t* const sClamp = reinterpret_cast<uint32_t*>(sAd + 4 * S * (S + 1));   // [2][KS] clamped-row bits
  Elem* const sDO = reinterpret_cast<Elem*>(sBuf);           // step 1 only: (C, KS) dO, V slices
  Elem* const sV = sDO + C * KS;

  const int slot = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t H = p.H, K = p.K, V = p.V;
  ChunkLoc loc;
  if (!locate_chunk(slot, p.cu_seqlens, p.chunk_offsets, p.N, p.T, loc)) return;
  const int64_t t0 = loc.bos + loc.c * C;
  const int rows = int(min(int64_t(C), loc.len - loc.c * C));   // rows past it: zeros, gates 0
  constexpr int kVecs = C * KS / 8 / kThreads;

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);

  // 1. dA = scale * dO V^T
  Tensor accA = partition_fragment_C(mma, Shape<Int<C>, Int<C>>{});        // (MMA, MMA_M, MMA_N)
  clear(accA);
  {
    Tensor sDOt = make_tensor(make_smem_ptr(sDO), typename Tr::LayoutF{});   // (C, KS)
    Tensor sVt = make_tensor(make_smem_ptr(sV), typename Tr::LayoutF{});     // (C, KS)
    const Elem* dO = static_cast<const Elem*>(p.dout) + (t0 * H + h) * V;
    const Elem* v = static_cast<const Elem*>(p.v) + (t0 * H + h) * V;
    for (int col0 = 0; col0 < V; col0 += KS) {
      CUTE_UNROLL
      for (int m = 0; m < kVecs; ++m) {
        const int u = tid + kThreads * m, r = u / (KS / 8), cc = u % (KS / 8) * 8;
        Vec a{}, b{};
        if (r < rows) {
          a = *reinterpret_cast<const Vec*>(dO + r * H * V + col0 + cc);
          b = *reinterpret_cast<const Vec*>(v + r * H * V + col0 + cc);
        }
        *reinterpret_cast<Vec*>(&sDOt(r, cc)) = a;
        *reinterpret_cast<Vec*>(&sVt(r, cc)) = b;
      }
      __syncthreads();
      gemm_ss<Tr>(accA, sDOt, sVt, typename Tr::LdsmN{}, typename Tr::LdsmN{}, tid);
      __syncthreads();
    }
  }
  Tensor tAh = make_tensor(make_smem_ptr(sAh), typename Tr::LayoutA{});     // (C, C)
  Tensor tAl = make_tensor(make_smem_ptr(sAl), typename Tr::LayoutA{});     // (C, C)
  Tensor tAht = make_tensor(make_smem_ptr(sAh), typename Tr::LayoutAt{});   // (C, C) dA^T
  Tensor tAlt = make_tensor(make_smem_ptr(sAl), typename Tr::LayoutAt{});   // (C, C)
  {
    Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<C>, Int<C>>{}));
    Tensor tSsAh = thr_mma.partition_C(tAh);
    Tensor tSsAl = thr_mma.partition_C(tAl);
    CUTE_STATIC_ASSERT_V(size(tScS) == size(accA));
    CUTE_UNROLL
    for (int i = 0; i < size(accA); i += 2) {   // values i, i + 1: adjacent columns
      cute::array<Elem, 2> hi, lo;
      CUTE_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int r = get<0>(tScS(i + e)), c = get<1>(tScS(i + e));
        const float x = c <= r ? accA(i + e) * p.scale : 0.f;
        hi[e] = static_cast<Elem>(x);
        lo[e] = static_cast<Elem>(x - static_cast<float>(hi[e]));
        if (r / S == c / S) sAd[(r / S * S + r % S) * (S + 1) + c % S] = x;
      }
      *reinterpret_cast<uint32_t*>(&tSsAh(i)) = *reinterpret_cast<const uint32_t*>(hi.data());
      *reinterpret_cast<uint32_t*>(&tSsAl(i)) = *reinterpret_cast<const uint32_t*>(lo.data());
    }
  }

  // 2. slices of K
  const int r_w = warp * S, cc = 2 * lane;                   // this warp's rows; this lane's column pair
  Tensor sKfAll = make_tensor(make_smem_ptr(sKf), SmemTile<Tr::kFoldRows, KS>{});   // (kFoldRows, KS)
  Tensor sQfAll = make_tensor(make_smem_ptr(sQf), SmemTile<Tr::kFoldRows, KS>{});   // (kFoldRows, KS)
  Tensor sKfW = make_tensor(make_smem_ptr(sKf + kf_base(warp) * KS), typename Tr::LayoutFt{});   // (KS, C) K_f^T
  Tensor sQfW = make_tensor(make_smem_ptr(sQf + qf_base(warp) * KS), typename Tr::LayoutFt{});   // (KS, C) Q_f^T
  Tensor sBufT = make_tensor(make_smem_ptr(sBuf), make_layout(Shape<Int<C>, Int<KS>>{}, make_stride(Int<LDF>{}, _1{})));
  Tensor tXsBuf = thr_mma.partition_C(sBufT);
  const float* ad = sAd + warp * S * (S + 1);                // this warp's diagonal block of dA
  const int gcol = tid % KS, ghalf = tid / KS, grow0 = ghalf * (C / 2);
  const int64_t row_stride = H * K, head_off = (t0 * H + h) * K;
  auto pair_at = [](const Elem* base) {                      // two adjacent elements as floats
    cute::array<Elem, 2> x;
    *reinterpret_cast<uint32_t*>(x.data()) = *reinterpret_cast<const uint32_t*>(base);
    return make_float2(static_cast<float>(x[0]), static_cast<float>(x[1]));
  };

  for (int col0 = 0; col0 < K; col0 += KS) {
    // gates and raw q, k of the slice
    {
      float rg[C / 2];
      load_gate_rows<Elem>(rg, p.g, p.g_fp32, head_off + col0 + gcol, row_stride, grow0, rows);
      const Elem* q = static_cast<const Elem*>(p.q) + head_off + col0;
      const Elem* k = static_cast<const Elem*>(p.k) + head_off + col0;
      CUTE_UNROLL
      for (int m = 0; m < kVecs; ++m) {
        const int u = tid + kThreads * m, r = u / (KS / 8), c8 = u % (KS / 8) * 8;
        Vec a{}, b{};
        if (r < rows) {
          a = *reinterpret_cast<const Vec*>(q + r * row_stride + c8);
          b = *reinterpret_cast<const Vec*>(k + r * row_stride + c8);
        }
        *reinterpret_cast<Vec*>(sQ + r * KS + c8) = a;
        *reinterpret_cast<Vec*>(sK + r * KS + c8) = b;
      }
      uint32_t clamped = 0;   // rows (of this half) whose gate the scan clamps: dg is 0 there
      CUTE_UNROLL
      for (int i = 0; i < C / 2; ++i) clamped |= uint32_t(rg[i] < kMinLogGate) << i;
      sClamp[ghalf * KS + gcol] = clamped;
      scan_gate_rows(rg);
      sTot[ghalf * KS + gcol] = rg[C / 2 - 1];
      __syncthreads();
      const float base = ghalf > 0 ? sTot[gcol] : 0.f;
      CUTE_UNROLL
      for (int i = 0; i < C / 2; ++i) sG[(grow0 + i) * KS + gcol] = rg[i] + base;
      __syncthreads();
    }
    auto g_at = [&](int r) { return *reinterpret_cast<const float2*>(sG + r * KS + cc); };

    // folds: K_f of warps 1..3 and Q_f of warps 0..2; this thread takes rows warp + 4m
    CUTE_UNROLL
    for (int w = 1; w < 4; ++w) {
      const float2 gr = g_at(w * S);
      CUTE_UNROLL
      for (int m = 0; m < 4 * w; ++m) {
        const int j = warp + 4 * m;
        const float2 gj = g_at(j), kj = pair_at(sK + j * KS + cc);
        cute::array<Elem, 2> x;
        x[0] = static_cast<Elem>(kj.x * exp2_ftz(gr.x - gj.x));
        x[1] = static_cast<Elem>(kj.y * exp2_ftz(gr.y - gj.y));
        *reinterpret_cast<uint32_t*>(&sKfAll(kf_base(w) + j, cc)) = *reinterpret_cast<const uint32_t*>(x.data());
      }
    }
    CUTE_UNROLL
    for (int w = 0; w < 3; ++w) {
      const float2 gr = g_at(w * S + S - 1);
      CUTE_UNROLL
      for (int m = 0; m < 12 - 4 * w; ++m) {
        const int i = (w + 1) * S + warp + 4 * m;
        const float2 gi = g_at(i), qi = pair_at(sQ + i * KS + cc);
        cute::array<Elem, 2> x;
        x[0] = static_cast<Elem>(qi.x * exp2_ftz(gi.x - gr.x));
        x[1] = static_cast<Elem>(qi.y * exp2_ftz(gi.y - gr.y));
        *reinterpret_cast<uint32_t*>(&sQfAll(qf_base(w) + i, cc)) = *reinterpret_cast<const uint32_t*>(x.data());
      }
    }
    __syncthreads();

    // the epilogue's global reads, in flight during the products (R: during dq's epilogue)
    const int64_t out0 = head_off + col0 + cc;
    float2 pin[S], rin[S];
    auto load_rows = [&](float2 (&x)[S], const float* src) {
      CUTE_UNROLL
      for (int i = 0; i < S; ++i)
        x[i] = r_w + i < rows ? __ldg(reinterpret_cast<const float2*>(src + out0 + (r_w + i) * row_stride))
                              : make_float2(0.f, 0.f);
    };
    load_rows(pin, p.dq_inter);
    const float2 next = __ldg(reinterpret_cast<const float2*>(p.state_dots + (int64_t(slot) * H + h) * K + col0 + cc));

    // diagonal block pair by pair: 2^(G_i - G_j) <= 1 for j <= i
    float dq_d[S][2], dk_d[S][2];
    CUTE_UNROLL
    for (int i = 0; i < S; ++i) dq_d[i][0] = dq_d[i][1] = dk_d[i][0] = dk_d[i][1] = 0.f;
    CUTE_UNROLL
    for (int i = 0; i < S; ++i) {
      const float2 gi = g_at(r_w + i), qi = pair_at(sQ + (r_w + i) * KS + cc);
      CUTE_UNROLL
      for (int j = 0; j <= i; ++j) {
        const float2 gj = g_at(r_w + j), kj = pair_at(sK + (r_w + j) * KS + cc);
        const float a = ad[i * (S + 1) + j];
        const float e0 = a * exp2_ftz(gi.x - gj.x), e1 = a * exp2_ftz(gi.y - gj.y);
        dq_d[i][0] += e0 * kj.x;
        dq_d[i][1] += e1 * kj.y;
        dk_d[j][0] += e0 * qi.x;
        dk_d[j][1] += e1 * qi.y;
      }
    }

    // epilogue: warp w finishes rows r_w..r_w+15 of dq, then of dk, through sBuf
    const float2 g_q = g_at(r_w), g_k = g_at(r_w + S - 1), g_last = g_at(C - 1);
    load_rows(rin, p.dk_inter);
    float d[S][2];   // q dq, then q dq - k dk
    {   // off-diagonal blocks on tensor cores (one accumulator live at a time: registers)
      Tensor acc_dq = partition_fragment_C(mma, Shape<Int<C>, Int<KS>>{});   // (MMA, MMA_M, MMA_N)
      clear(acc_dq);
      gemm_ss<Tr>(acc_dq, tAh, sKfW, typename Tr::LdsmN{}, typename Tr::LdsmT{}, tid, 0, warp);
      gemm_ss<Tr>(acc_dq, tAl, sKfW, typename Tr::LdsmN{}, typename Tr::LdsmT{}, tid, 0, warp);
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dq); ++i) tXsBuf(i) = acc_dq(i);
    }
    __syncwarp();
    CUTE_UNROLL
    for (int i = 0; i < S; ++i) {
      const int r = r_w + i;
      const float2 g = g_at(r), qi = pair_at(sQ + r * KS + cc);
      const float x0 = exp2_ftz(g.x) * pin[i].x + exp2_ftz(g.x - g_q.x) * sBuf[r * LDF + cc] + dq_d[i][0];
      const float x1 = exp2_ftz(g.y) * pin[i].y + exp2_ftz(g.y - g_q.y) * sBuf[r * LDF + cc + 1] + dq_d[i][1];
      d[i][0] = qi.x * x0;
      d[i][1] = qi.y * x1;
      if (r < rows) {
        cute::array<Elem, 2> o;
        o[0] = static_cast<Elem>(x0);
        o[1] = static_cast<Elem>(x1);
        *reinterpret_cast<uint32_t*>(static_cast<Elem*>(p.dq) + out0 + r * row_stride) =
            *reinterpret_cast<const uint32_t*>(o.data());
      }
    }
    __syncwarp();
    {
      Tensor acc_dk = partition_fragment_C(mma, Shape<Int<C>, Int<KS>>{});   // (MMA, MMA_M, MMA_N)
      clear(acc_dk);
      gemm_ss<Tr>(acc_dk, tAht, sQfW, typename Tr::LdsmT{}, typename Tr::LdsmT{}, tid, warp + 1, 4);
      gemm_ss<Tr>(acc_dk, tAlt, sQfW, typename Tr::LdsmT{}, typename Tr::LdsmT{}, tid, warp + 1, 4);
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dk); ++i) tXsBuf(i) = acc_dk(i);
    }
    __syncwarp();
    CUTE_UNROLL
    for (int i = 0; i < S; ++i) {
      const int r = r_w + i;
      const float2 g = g_at(r), ki = pair_at(sK + r * KS + cc);
      const float x0 = exp2_ftz(g_last.x - g.x) * rin[i].x + exp2_ftz(g_k.x - g.x) * sBuf[r * LDF + cc] + dk_d[i][0];
      const float x1 = exp2_ftz(g_last.y - g.y) * rin[i].y + exp2_ftz(g_k.y - g.y) * sBuf[r * LDF + cc + 1] + dk_d[i][1];
      d[i][0] -= ki.x * x0;
      d[i][1] -= ki.y * x1;
      if (r < rows) {
        cute::array<Elem, 2> o;
        o[0] = static_cast<Elem>(x0);
        o[1] = static_cast<Elem>(x1);
        *reinterpret_cast<uint32_t*>(static_cast<Elem*>(p.dk) + out0 + r * row_stride) =
            *reinterpret_cast<const uint32_t*>(o.data());
      }
    }

    // 3. d summed from each row to the chunk's end: within the warp, then the later warps
    float run0 = 0.f, run1 = 0.f;
    CUTE_UNROLL
    for (int i = S - 1; i >= 0; --i) {
      run0 += d[i][0];
      run1 += d[i][1];
      d[i][0] = run0;
      d[i][1] = run1;
    }
    *reinterpret_cast<float2*>(sWT + warp * KS + cc) = make_float2(run0, run1);
    __syncthreads();
    float later0 = 0.f, later1 = 0.f;
    for (int w = warp + 1; w < 4; ++w) {
      later0 += sWT[w * KS + cc];
      later1 += sWT[w * KS + cc + 1];
    }
    later0 += next.x;
    later1 += next.y;
    // clamped gates: no gradient (bits of the rows r_w.. of columns cc, cc + 1)
    const int half = r_w / (C / 2), bit0 = r_w % (C / 2);
    const uint32_t clamp0 = sClamp[half * KS + cc] >> bit0, clamp1 = sClamp[half * KS + cc + 1] >> bit0;
    CUTE_UNROLL
    for (int i = 0; i < S; ++i) {
      const int r = r_w + i;
      if (r < rows) {
        const int64_t off = out0 + r * row_stride;
        const float x0 = (clamp0 >> i) & 1u ? 0.f : d[i][0] + later0;
        const float x1 = (clamp1 >> i) & 1u ? 0.f : d[i][1] + later1;
        if (p.g_fp32) {
          *reinterpret_cast<float2*>(static_cast<float*>(p.dg) + off) = make_float2(x0, x1);
        } else {
          cute::array<Elem, 2> o;
          o[0] = static_cast<Elem>(x0);
          o[1] = static_cast<Elem>(x1);
          *reinterpret_cast<uint32_t*>(static_cast<Elem*>(p.dg) + off) = *reinterpret_cast<const uint32_t*>(o.data());
        }
      }
    }
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
