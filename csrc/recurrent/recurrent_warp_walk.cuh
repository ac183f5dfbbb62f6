// Forward walk with one warp per (sequence, value head, 8 value columns), for the families
// without key gates or low-rank terms (linear attention, simple GLA, retention, the delta
// rule and the gated delta rule, gv and l2norm included) at K = 64 or 128, 16-bit inputs.
// Included by recurrent_kernel.cuh after its shared helpers (seq_info, time_index, FastDiv).
//
// Lane l holds column l % 8 of the state rows (l / 8) * KR .. + KR - 1 (KR = K / 4) in
// registers and reads its KR elements of q and k straight from global memory with 16-byte
// loads (the 8 lanes of a row group read the same bytes: one transaction). A sum over K is a
// KR-term FMA chain and two shuffles, in a fixed order. No shared memory and no block
// barrier, where the block kernel meets at three barriers a step (staging, u, o) on eight
// warps. At 8,256,16,128 (H200): simple GLA 366 -> 280 us, delta rule 445 -> 339 us.
// GLA and DPLR measured slower this way (396 -> 703, 492 -> 784 us: each lane takes the exp
// of its 32 key gates, 16x the block kernel's exps, and a, b crowd the registers), so
// they stay on the block kernel. Loading the next step's q and k ahead spilled (152 bytes
// at 128 registers); the 16 warps an SM holds cover the loads instead.
#pragma once

namespace fla {
namespace recurrent {
namespace warp_walk {

constexpr int kCols = 8;    // value columns a warp (lane % 8)
constexpr int kGroups = 4;  // row groups a warp (lane / 8)
constexpr int kWarps = 4;   // independent warps a block

// KR consecutive elements of a K-vector as loaded (16-byte pieces), widened on use.
template <typename T, int KR>
struct Rows {
  static constexpr int kWords = KR * int(sizeof(T)) / 4;
  static_assert(sizeof(T) == 2 && kWords % 4 == 0, "16-bit elements, whole 16-byte pieces");
  uint32_t w[kWords];  // (words, not uint4s: taking the pieces' address put them in local memory)

  __device__ __forceinline__ void load(const T* src) {
    const uint4* p = reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      const uint4 x = __ldg(p + i);
      w[4 * i] = x.x;
      w[4 * i + 1] = x.y;
      w[4 * i + 2] = x.z;
      w[4 * i + 3] = x.w;
    }
  }
  // Element i (a compile-time index once unrolled).
  __device__ __forceinline__ float operator[](int i) const {
    const uint32_t word = w[i / 2];
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      return __uint_as_float(i % 2 ? word & 0xffff0000u : word << 16);
    else
      return __half2float(__ushort_as_half(static_cast<unsigned short>(i % 2 ? word >> 16 : word & 0xffffu)));
  }
};

// Sum over the warp's four row groups (lanes l, l ^ 8, l ^ 16, l ^ 24): every lane ends with
// its column's total, added in the same order on every lane.
__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  x += __shfl_xor_sync(0xffffffffu, x, 16);
  return x;
}

// The per-step scalars of this lane's column, as loaded a step ahead.
struct Scalars {
  float v, log_gamma, log_gv, beta;
};

template <typename T>
__device__ __forceinline__ Scalars load_scalars(const RecurrentParams& p, int64_t t, int hv, int col, bool col_ok) {
  Scalars sc;
  const int64_t tv = (t * p.HV + hv) * p.V + col;
  sc.v = col_ok ? to_float(static_cast<const T*>(p.v)[tv]) : 0.f;
  sc.log_gamma = p.g ? p.g[t * p.HV + hv] : 0.f;
  sc.log_gv = (p.gv && col_ok) ? p.gv[tv] : 0.f;
  sc.beta = 1.f;
  if (p.delta) {
    const int64_t bi = p.beta_per_v ? tv : t * p.HV + hv;
    if (p.beta_per_v && !col_ok) sc.beta = 0.f;
    else if (p.beta_fp32) sc.beta = static_cast<const float*>(p.beta)[bi];
    else sc.beta = to_float(static_cast<const T*>(p.beta)[bi]);
  }
  return sc;
}

template <typename T, int KMAX>
__global__ void __launch_bounds__(kWarps * 32, 4) recurrent_fwd_warp_kernel(const RecurrentParams p, const TileDivs divs) {
  constexpr int KR = KMAX / kGroups;
  const int lane = threadIdx.x & 31;
  const uint32_t tile = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const uint32_t NV = divs.nv.d, HV = static_cast<uint32_t>(p.HV);  // value tiles a head
  if (tile >= static_cast<uint32_t>(p.N) * HV * NV) return;  // a whole warp: no barrier below
  const uint32_t nh = divs.nv(tile);
  const int vt = static_cast<int>(tile - nh * NV);
  const int n = static_cast<int>(divs.hv(nh));
  const int hv = static_cast<int>(nh - static_cast<uint32_t>(n) * HV);
  const int h = static_cast<int>(divs.group(static_cast<uint32_t>(hv)));
  const int col = vt * kCols + lane % kCols, row0 = lane / kCols * KR;
  const bool col_ok = col < p.V;

  const SeqInfo sq = seq_info(p, n);
  const int64_t state_off = (static_cast<int64_t>(n) * p.HV + hv) * p.K * p.V;
  const int64_t slot_stride = static_cast<int64_t>(p.HV) * p.K * p.V;
  const int64_t head_off = static_cast<int64_t>(hv) * p.K * p.V;
  auto elem = [&](int i) { return static_cast<int64_t>(row0 + i) * p.V + col; };  // (row0 + i, col) of [K, V]
  auto store_state = [&](float* base, const float (&s)[KR]) {
    if (!col_ok) return;
#pragma unroll
    for (int i = 0; i < KR; ++i) base[elem(i)] = s[i];
  };
  auto rows_of = [&](const void* x, int64_t t) { return static_cast<const T*>(x) + (t * p.H + h) * p.K + row0; };

  float s[KR];
#pragma unroll
  for (int i = 0; i < KR; ++i) s[i] = (p.h0 && col_ok) ? p.h0[state_off + elem(i)] : 0.f;

  Scalars next{};
  if (sq.len > 0) next = load_scalars<T>(p, time_index(p, sq, 0), hv, col, col_ok);
  for (int step = 0; step < sq.len; ++step) {
    const int64_t t = time_index(p, sq, step);
    if (p.checkpoints && step % CKPT == 0)
      store_state(p.checkpoints + (sq.ckpt_base + step / CKPT) * slot_stride + head_off, s);
    Rows<T, KR> q, k;
    q.load(rows_of(p.q, t));
    k.load(rows_of(p.k, t));
    const Scalars sc = next;
    if (step + 1 < sq.len) next = load_scalars<T>(p, time_index(p, sq, step + 1), hv, col, col_ok);

    float q_scale = p.scale, k_scale = 1.f;
    if (p.l2norm_qk) {  // x / sqrt(|x|^2 + 1e-6), applied to the sums below
      float qq = 0.f, kk = 0.f;
#pragma unroll
      for (int i = 0; i < KR; ++i) {
        qq += q[i] * q[i];
        kk += k[i] * k[i];
      }
      q_scale *= rsqrtf(group_sum(qq) + 1e-6f);
      k_scale = rsqrtf(group_sum(kk) + 1e-6f);
    }
    // S = exp(g) S diag(exp(gv)); v' = beta (v - S^T k) for the delta rule, else v;
    // S += k v'^T; o = S^T (scale q)
    float gamma = p.g ? __expf(sc.log_gamma) : 1.f;
    if (p.gv) gamma *= __expf(sc.log_gv);
#pragma unroll
    for (int i = 0; i < KR; ++i) s[i] *= gamma;
    float vp = sc.v;
    if (p.delta) {
      float part = 0.f;
#pragma unroll
      for (int i = 0; i < KR; ++i) part += k[i] * s[i];
      vp = sc.beta * (sc.v - k_scale * group_sum(part));
    }
    const float kv = k_scale * vp;
#pragma unroll
    for (int i = 0; i < KR; ++i) s[i] += k[i] * kv;
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < KR; ++i) part += q[i] * s[i];
    const float o = q_scale * group_sum(part);
    if (lane < kCols && col_ok) static_cast<T*>(p.o)[(t * p.HV + hv) * p.V + col] = from_float<T>(o);
  }
  if (p.ht) store_state(p.ht + state_off, s);
  if (p.checkpoints) {
    // Zero this sequence's spare slots (up to the next sequence's first), as the block kernel.
    const int64_t end = n + 1 < p.N ? seq_info(p, n + 1).ckpt_base : p.ckpt_slots;
#pragma unroll
    for (int i = 0; i < KR; ++i) s[i] = 0.f;
    for (int64_t slot = sq.ckpt_base + (sq.len + CKPT - 1) / CKPT; slot < end; ++slot)
      store_state(p.checkpoints + slot * slot_stride + head_off, s);
  }
}

// The instantiations that have a warp walk: 16-bit inputs (fp32 q and k take twice the
// registers), K = 64 or 128 (at 256, 64 state rows a lane).
template <typename T, int KMAX>
constexpr bool kHas = sizeof(T) == 2 && (KMAX == 64 || KMAX == 128);

// Whether it takes these inputs: no key gates or low-rank terms, K fills KMAX, and each
// lane's rows of q and k are whole 16-byte pieces.
inline bool takes(const RecurrentParams& p, int kmax) {
  auto aligned = [](const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; };
  return !p.gk && !p.a && !p.b && p.K == kmax && aligned(p.q) && aligned(p.k);
}

template <typename T, int KMAX>
void launch(const RecurrentParams& p, cudaStream_t stream) {
  static_assert(kHas<T, KMAX>, "no warp walk for this instantiation");
  const int64_t tiles = checked_tile_count(p, kCols);
  if (tiles == 0) return;
  recurrent_fwd_warp_kernel<T, KMAX><<<static_cast<unsigned>((tiles + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(
      p, tile_divs(p, kCols));
  FLA_CHECK_LAUNCH();
}

}  // namespace warp_walk
}  // namespace recurrent
}  // namespace fla
