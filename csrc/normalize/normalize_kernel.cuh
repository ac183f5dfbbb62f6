// Kernels of the linear-attention normalisation; see normalize.h for the math.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "common/device.cuh"
#include "common/sequence_slots.cuh"
#include "common/cuda_check.h"
#include "normalize/normalize.h"

namespace fla {
namespace normalize {

constexpr int C = kNormChunk, kThreads = kNormThreads, kWarps = kThreads / 32;
constexpr int kUnroll = 8;  // tokens loaded ahead per thread
static_assert(C % kUnroll == 0, "whole load groups per chunk");

// 16-byte vectors of rows of a [rows, H, V] tensor, flattened over the chunk's (token,
// vector) pairs: vector i is token i / vpr, elements (i % vpr) * kVec.. of its row. Used when
// V * sizeof(T) is a multiple of 16 (and the pointers are 16-byte aligned), so a thread issues
// all the loads of a round before it uses any (one memory latency per round, not per element).
template <typename T>
struct RowVectors {
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kPerThread = 4;  // vectors per thread per round
  int vpr, count;
  int64_t t0;

  __device__ __forceinline__ RowVectors(const NormalizeParams& p, int64_t t0_, int nt)
      : vpr(p.V / kVec), count(nt * (p.V / kVec)), t0(t0_) {}
  __device__ __forceinline__ static bool usable(const NormalizeParams& p, const void* a, const void* b) {
    return p.V % kVec == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
  }
  __device__ __forceinline__ int index(int round, int u) const {
    return (round * kPerThread + u) * kNormThreads + static_cast<int>(threadIdx.x);
  }
  __device__ __forceinline__ int64_t offset(const NormalizeParams& p, int h, int i, int& token) const {
    token = i / vpr;
    return ((t0 + token) * p.H + h) * p.V + static_cast<int64_t>(i - token * vpr) * kVec;
  }
  __device__ __forceinline__ void load(const NormalizeParams& p, const T* src, int h, int round,
                                       uint4 (&out)[kPerThread]) const {
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int i = index(round, u);
      int token;
      if (i < count) out[u] = *reinterpret_cast<const uint4*>(src + offset(p, h, i, token));
    }
  }
  __device__ __forceinline__ int rounds() const { return (count + kPerThread * kNormThreads - 1) / (kPerThread * kNormThreads); }
};

// The tokens [t0, t1) of a chunk (rows of the packed [B*T] axis) and its sequence.
struct Span {
  int n;
  int64_t t0, t1;
  bool ok;
};

__device__ __forceinline__ Span chunk_span(const NormalizeParams& p, int64_t chunk) {
  Span s{0, 0, 0, false};
  int64_t bos, eos, j;   // the sequence's rows and the chunk's index in it
  if (!p.cu_seqlens) {
    const int64_t per_seq = (p.T + C - 1) / C;
    s.n = static_cast<int>(chunk / per_seq);
    bos = static_cast<int64_t>(s.n) * p.T;
    eos = bos + p.T;
    j = chunk % per_seq;
    s.ok = s.n < p.N;
  } else {
    if (chunk >= p.chunk_offsets[p.N]) return s;
    int lo = 0, hi = p.N - 1;  // the last sequence whose first chunk is <= chunk (skips empty ones)
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.chunk_offsets[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    s.n = lo;
    bos = p.cu_seqlens[lo];
    eos = p.cu_seqlens[lo + 1];
    j = chunk - p.chunk_offsets[lo];
    s.ok = true;
  }
  if (p.end_aligned) {
    s.t1 = eos - j * C;
    s.t0 = max(bos, s.t1 - C);
  } else {
    s.t0 = bos + j * C;
    s.t1 = min(eos, s.t0 + C);
  }
  return s;
}

// One thread's channel e of a [rows, H, K] tensor at rows t0 + j, j < nt (zeros past nt).
// (A whole group takes the unguarded branch: a guard per element compiled to a branch and
// 64-bit index math around every load, which made the forward pass instruction-bound.)
template <typename T>
__device__ __forceinline__ void load_channel(const T* x, int64_t t0, int j0, int nt, int h, int e,
                                             const NormalizeParams& p, float (&out)[kUnroll]) {
  const int64_t stride = static_cast<int64_t>(p.H) * p.K;
  const T* src = x + ((t0 + j0) * p.H + h) * p.K + e;
  if (j0 + kUnroll <= nt) {
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) out[j] = to_float(src[j * stride]);
  } else {
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) out[j] = j0 + j < nt ? to_float(src[j * stride]) : 0.f;
  }
}

// x[j] (+ dst[j * stride] when add) -> dst[j * stride] for j < left (a whole group
// unguarded, as load_channel).
template <typename T>
__device__ __forceinline__ void store_channel(T* dst, int64_t stride, int left, const float (&x)[kUnroll], bool add) {
  if (left >= kUnroll) {
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) dst[j * stride] = from_float<T>(x[j] + (add ? to_float(dst[j * stride]) : 0.f));
  } else {
#pragma unroll
    for (int j = 0; j < kUnroll; ++j)
      if (j < left) dst[j * stride] = from_float<T>(x[j] + (add ? to_float(dst[j * stride]) : 0.f));
  }
}

// Sum of channel e of x over the chunk's tokens (scaled per token by w when given; w must
// hold zeros, not garbage, past the chunk's last token: 0 * NaN would not vanish).
template <typename T>
__device__ __forceinline__ float chunk_total(const T* x, const float* w, const Span& s, int h, int e,
                                            const NormalizeParams& p) {
  const int nt = static_cast<int>(s.t1 - s.t0);
  float acc = 0.f;
  for (int j0 = 0; j0 < nt; j0 += kUnroll) {
    float xv[kUnroll];
    load_channel(x, s.t0, j0, nt, h, e, p, xv);
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) acc += (w ? w[j0 + j] : 1.f) * xv[j];  // (zeros past nt)
  }
  return acc;
}

// Threads per block of the carry scan: small blocks spread its few threads over every SM.
constexpr int kScanThreads = 64;

// Per-sequence exclusive scan of chunk totals [chunks, H, K], in place, in chunk order
// (forward) or from the last chunk (reverse), starting from init [N, H, K] (or 0); the
// sum over every chunk goes to last [N, H, K]. One thread per (sequence, head, channel).
template <bool kReverse>
__global__ void __launch_bounds__(kScanThreads) carry_scan_kernel(const NormalizeParams p, float* carry,
                                                              const float* init, float* last) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kScanThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.N) * p.H * p.K) return;
  const int e = static_cast<int>(idx % p.K), h = static_cast<int>((idx / p.K) % p.H);
  const int n = static_cast<int>(idx / (static_cast<int64_t>(p.H) * p.K));
  int64_t c0, c1;
  sequence_slots<C>(n, p.cu_seqlens, p.chunk_offsets, p.T, c0, c1);
  float acc = init ? init[idx] : 0.f;
  // 32 chunks' totals loaded per round: a round costs one memory latency, and there are only
  // N * H * K threads (8192 at B=4, H=16, K=128: 8 loads a round took 7-11 us at T=4096)
  constexpr int kScanUnroll = 32;
  for (int64_t i0 = 0; i0 < c1 - c0; i0 += kScanUnroll) {
    float tot[kScanUnroll];
#pragma unroll
    for (int j = 0; j < kScanUnroll; ++j) {  // loads first: they do not wait on the running sum
      const int64_t c = kReverse ? c1 - 1 - (i0 + j) : c0 + i0 + j;
      tot[j] = i0 + j < c1 - c0 ? carry[(c * p.H + h) * p.K + e] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kScanUnroll; ++j) {
      if (i0 + j < c1 - c0) {
        const int64_t c = kReverse ? c1 - 1 - (i0 + j) : c0 + i0 + j;
        carry[(c * p.H + h) * p.K + e] = acc;
        acc += tot[j];
      }
    }
  }
  if (last) last[idx] = acc;
}

// ---------------------------------------------------------------------------------------
// The key-dim path of whole 16-byte vectors (kVR > 0: K * sizeof(T) == 16 * kVR): thread
// tid owns vector j = tid % kVR (channels j * kVec ..) of the kRows consecutive rows of row
// group g = tid / kVR. A row group is kVR lanes of one warp, so a token's dot product
// reduces by shuffles, and a thread issues every load before it uses one: a block waits on
// memory about once, where one thread per key channel (kVR == 0, any K) waits once per 8
// tokens. Sums over the chunk's rows are per-thread partials over the thread's rows, then
// the row groups' partials through shared memory, added in row order (deterministic).

template <typename T>
__device__ __forceinline__ void unpack(const uint4& u, float (&f)[16 / sizeof(T)]) {
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int m = 0; m < int(16 / sizeof(T)); ++m) f[m] = to_float(e[m]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&f)[16 / sizeof(T)]) {
  uint4 u;
  T* e = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int m = 0; m < int(16 / sizeof(T)); ++m) e[m] = from_float<T>(f[m]);
  return u;
}

template <typename T, int kVR>
struct KeyTile {
  static constexpr int kVec = 16 / int(sizeof(T));  // channels per vector
  static constexpr int kK = kVR * kVec;             // the head dim
  static constexpr int kGroups = kThreads / kVR;
  static constexpr int kRows = C / kGroups;         // rows per thread
  static_assert(kVR > 0 && 32 % kVR == 0 && C % kGroups == 0, "row groups tile the chunk inside warps");
  using Partials = float[kThreads * kVec];          // one partial per thread and channel

  int g, j, rows_ok;      // rows_ok: how many of the thread's rows lie in the chunk
  int64_t first, stride;  // element offset of the thread's first vector; row stride

  __device__ __forceinline__ KeyTile(const NormalizeParams& p, const Span& s, int h)
      : g(static_cast<int>(threadIdx.x) / kVR), j(static_cast<int>(threadIdx.x) % kVR) {
    const int nt = static_cast<int>(s.t1 - s.t0);
    rows_ok = max(0, min(kRows, nt - g * kRows));
    stride = static_cast<int64_t>(p.H) * kK;
    first = (s.t0 + g * kRows) * stride + h * kK + j * kVec;
  }
  __device__ __forceinline__ int row(int r) const { return g * kRows + r; }
  // the thread's rows (zeros past the chunk's last token)
  __device__ __forceinline__ void load(const void* x, uint4 (&out)[kRows]) const {
    const T* src = static_cast<const T*>(x) + first;
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      out[r] = r < rows_ok ? *reinterpret_cast<const uint4*>(src + r * stride) : make_uint4(0, 0, 0, 0);
  }
  // f (+ the row's old values `old` when add) -> row r of x
  __device__ __forceinline__ void store(void* x, int r, float (&f)[kVec], bool add, const uint4& old) const {
    if (add) {
      float y[kVec];
      unpack<T>(old, y);
#pragma unroll
      for (int m = 0; m < kVec; ++m) f[m] += y[m];
    }
    if (r < rows_ok) *reinterpret_cast<uint4*>(static_cast<T*>(x) + first + r * stride) = pack<T>(f);
  }
  // the thread's channels of a [chunks, H, K] fp32 carry row
  __device__ __forceinline__ void load_carry(const float* carry_row, float (&f)[kVec]) const {
#pragma unroll
    for (int i = 0; i < kVec / 4; ++i) {
      const float4 x = reinterpret_cast<const float4*>(carry_row + j * kVec)[i];
      f[4 * i] = x.x, f[4 * i + 1] = x.y, f[4 * i + 2] = x.z, f[4 * i + 3] = x.w;
    }
  }
  __device__ __forceinline__ void put(float* s_part, const float (&f)[kVec]) const {
#pragma unroll
    for (int i = 0; i < kVec / 4; ++i)
      reinterpret_cast<float4*>(s_part + threadIdx.x * kVec)[i] = make_float4(f[4 * i], f[4 * i + 1], f[4 * i + 2], f[4 * i + 3]);
  }
  // after a barrier: acc += the partials of the row groups before g (kAfter: after g)
  template <bool kAfter>
  __device__ __forceinline__ void add_groups(const float* s_part, float (&acc)[kVec]) const {
    for (int i = 0; i < kGroups - 1; ++i) {
      const int gg = kAfter ? kGroups - 1 - i : i;
      if (kAfter ? gg <= g : gg >= g) break;
#pragma unroll
      for (int q = 0; q < kVec / 4; ++q) {
        const float4 x = reinterpret_cast<const float4*>(s_part + (gg * kVR + j) * kVec)[q];
        acc[4 * q] += x.x, acc[4 * q + 1] += x.y, acc[4 * q + 2] += x.z, acc[4 * q + 3] += x.w;
      }
    }
  }
  // after a barrier: channel e's sum over all row groups, in row order
  __device__ __forceinline__ static float channel_total(const float* s_part, int e) {
    float acc = 0.f;
    for (int gg = 0; gg < kGroups; ++gg) acc += s_part[(gg * kVR + e / kVec) * kVec + e % kVec];
    return acc;
  }
};

// Chunk totals of the key channels, weighted per row by w when given (w: zeros past the
// chunk's last token), from the thread's rows xv, into out [K]. Ends with a barrier.
template <typename T, int kVR>
__device__ __forceinline__ void vec_chunk_total(const KeyTile<T, kVR>& kt, const uint4 (&xv)[KeyTile<T, kVR>::kRows],
                                                const float* w, float* out) {
  using KT = KeyTile<T, kVR>;
  __shared__ __align__(16) typename KT::Partials s_part;
  float part[KT::kVec] = {};
#pragma unroll
  for (int r = 0; r < KT::kRows; ++r) {
    float x[KT::kVec];
    unpack<T>(xv[r], x);
    const float wr = w ? w[kt.row(r)] : 1.f;
#pragma unroll
    for (int m = 0; m < KT::kVec; ++m) part[m] += wr * x[m];
  }
  kt.put(s_part, part);
  __syncthreads();
  if (threadIdx.x < KT::kK) out[threadIdx.x] = KT::channel_total(s_part, threadIdx.x);
}

// ---------------------------------------------------------------------------------------
// Forward. Blocks are (chunk, head).

template <typename T, int kVR>
__global__ void __launch_bounds__(kThreads) key_totals_kernel(const NormalizeParams p) {
  const Span s = chunk_span(p, blockIdx.x);
  const int h = blockIdx.y;
  // rows past the last chunk of packed sequences (the grid is a bound) are zeroed: the
  // buffer is an output (kept for the backward) and holds no uninitialised memory
  float* out = p.k_carry + (static_cast<int64_t>(blockIdx.x) * p.H + h) * p.K;
  if (!s.ok) {
    for (int e = threadIdx.x; e < p.K; e += kThreads) out[e] = 0.f;
    return;
  }
  if constexpr (kVR > 0) {
    const KeyTile<T, kVR> kt(p, s, h);
    uint4 kv[KeyTile<T, kVR>::kRows];
    kt.load(p.k, kv);
    vec_chunk_total(kt, kv, nullptr, out);
  } else {
    const int e = threadIdx.x;
    if (e < p.K) out[e] = chunk_total(static_cast<const T*>(p.k), nullptr, s, h, e, p);
  }
}

// den_t of the chunk's tokens -> s_den[t - t0] and p.den, from the key sum before the chunk
// (k_carry). One thread per key channel: a warp sum per token.
template <typename T>
__device__ __forceinline__ void chunk_dens(const NormalizeParams& p, const Span& s, int h, float* s_den) {
  __shared__ float s_part[kWarps][C];  // per-warp partial <q_t, c_t>
  const int e = threadIdx.x, lane = e & 31, warp = e >> 5;
  const int nt = static_cast<int>(s.t1 - s.t0);
  const bool e_ok = e < p.K;
  float c = e_ok ? p.k_carry[(static_cast<int64_t>(blockIdx.x) * p.H + h) * p.K + e] : 0.f;
  for (int j0 = 0; j0 < nt; j0 += kUnroll) {
    float qv[kUnroll], kv[kUnroll];
    load_channel(static_cast<const T*>(p.q), s.t0, j0, e_ok ? nt : 0, h, e, p, qv);
    load_channel(static_cast<const T*>(p.k), s.t0, j0, e_ok ? nt : 0, h, e, p, kv);
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      c += kv[j];
      const float part = warp_sum(qv[j] * c);
      if (lane == 0) s_part[warp][j0 + j] = part;
    }
  }
  __syncthreads();
  if (e < nt) {
    float dot = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) dot += s_part[w][e];  // fixed order
    const float den = p.scale * dot + 1e-10f;
    s_den[e] = den;
    p.den[(s.t0 + e) * p.H + h] = den;
  }
}

// The same from whole key vectors: the key sum at each of the thread's rows from the
// carry and the row groups before its own, the dot over a row group by shuffles.
template <typename T, int kVR>
__device__ __forceinline__ void chunk_dens_vec(const NormalizeParams& p, const Span& s, int h, float* s_den) {
  using KT = KeyTile<T, kVR>;
  constexpr int kVec = KT::kVec, kRows = KT::kRows;
  __shared__ __align__(16) typename KT::Partials s_part;
  const KT kt(p, s, h);
  uint4 qv[kRows], kv[kRows];
  kt.load(p.q, qv);
  kt.load(p.k, kv);
  float c[kVec];
  kt.load_carry(p.k_carry + (static_cast<int64_t>(blockIdx.x) * p.H + h) * kVec * kVR, c);
  float part[kVec] = {};
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float x[kVec];
    unpack<T>(kv[r], x);
#pragma unroll
    for (int m = 0; m < kVec; ++m) part[m] += x[m];
  }
  kt.put(s_part, part);
  __syncthreads();
  kt.template add_groups<false>(s_part, c);
  float dot[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float x[kVec], y[kVec];
    unpack<T>(kv[r], x);
    unpack<T>(qv[r], y);
    dot[r] = 0.f;
#pragma unroll
    for (int m = 0; m < kVec; ++m) {
      c[m] += x[m];
      dot[r] += y[m] * c[m];
    }
  }
#pragma unroll
  for (int off = kVR / 2; off > 0; off /= 2)  // lanes of one row group (a fixed order)
#pragma unroll
    for (int r = 0; r < kRows; ++r) dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], off);
  if (kt.j == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < kt.rows_ok) {
        const float den = p.scale * dot[r] + 1e-10f;
        s_den[kt.row(r)] = den;
        p.den[(s.t0 + kt.row(r)) * p.H + h] = den;
      }
    }
  }
}

// kWithO: o = o_raw / den too (the standalone normaliser); without, den only (the fused op,
// whose chunk pass divides as it stores o): a kernel of its own, the o rows' registers would
// otherwise halve its blocks per SM.
template <typename T, int kVR, bool kWithO>
__global__ void __launch_bounds__(kThreads) normalize_fwd_kernel(const NormalizeParams p) {
  __shared__ float s_den[C];
  const Span s = chunk_span(p, blockIdx.x);
  if (!s.ok) return;
  const int h = blockIdx.y;
  if constexpr (!kWithO) {
    if constexpr (kVR > 0) chunk_dens_vec<T, kVR>(p, s, h, s_den);
    else chunk_dens<T>(p, s, h, s_den);
    return;
  }
  const int nt = static_cast<int>(s.t1 - s.t0);
  const T* o_raw = static_cast<const T*>(p.o_raw);
  T* o = static_cast<T*>(p.o);
  using RV = RowVectors<T>;
  const RV rv(p, s.t0, nt);
  const bool vec = RV::usable(p, o_raw, o);
  uint4 ov[RV::kPerThread];
  if (vec) rv.load(p, o_raw, h, 0, ov);  // in flight during the key sums

  if constexpr (kVR > 0) chunk_dens_vec<T, kVR>(p, s, h, s_den);
  else chunk_dens<T>(p, s, h, s_den);
  __syncthreads();
  if (vec) {
    for (int round = 0; round < rv.rounds(); ++round) {
      if (round > 0) rv.load(p, o_raw, h, round, ov);
#pragma unroll
      for (int u = 0; u < RV::kPerThread; ++u) {
        const int i = rv.index(round, u);
        if (i >= rv.count) break;
        int j;
        const int64_t off = rv.offset(p, h, i, j);
        T* x = reinterpret_cast<T*>(&ov[u]);
#pragma unroll
        for (int m = 0; m < RV::kVec; ++m) x[m] = from_float<T>(to_float(x[m]) / s_den[j]);
        *reinterpret_cast<uint4*>(o + off) = ov[u];
      }
    }
    return;
  }
  for (int i = threadIdx.x; i < nt * p.V; i += kThreads) {
    const int j = i / p.V;
    const int64_t off = ((s.t0 + j) * p.H + h) * p.V + (i - j * p.V);
    o[off] = from_float<T>(to_float(o_raw[off]) / s_den[j]);
  }
}

// ---------------------------------------------------------------------------------------
// Backward.

// w_t and do_raw_t for the chunk's tokens (one warp per token), then the chunk total of
// w_t q_t per channel. With dots_of_output, o_raw holds o = o_raw / den: <do, o_raw> / den^2
// is <do, o> / den.
template <typename T, int kVR>
__global__ void __launch_bounds__(kThreads, 4) normalize_bwd_dots_kernel(const NormalizeParams p) {
  using RV = RowVectors<T>;
  using KT = KeyTile<T, (kVR > 0 ? kVR : 4)>;   // (unused when kVR == 0)
  __shared__ float s_w[C];
  __shared__ float s_den[C];
  __shared__ float s_part[C][kNormThreads / RV::kVec];  // per-vector partials of <do_t, o_raw_t>
  const Span s = chunk_span(p, blockIdx.x);
  if (!s.ok) return;
  const int h = blockIdx.y, e = threadIdx.x, lane = e & 31, warp = e >> 5;
  const int nt = static_cast<int>(s.t1 - s.t0);
  const T* dout = static_cast<const T*>(p.dout);
  const T* o_raw = static_cast<const T*>(p.o_raw);
  T* do_raw = static_cast<T*>(p.do_raw);
  const RV rv(p, s.t0, nt);
  float* q_total = p.q_carry + (static_cast<int64_t>(blockIdx.x) * p.H + h) * p.K;
  uint4 qv[KT::kRows];
  const KT kt(p, s, h);
  if constexpr (kVR > 0) kt.load(p.q, qv);  // in flight during the dots
  if (e >= nt && e < C) s_w[e] = 0.f;  // (read by the chunk totals after the barrier below)
  if (RV::usable(p, dout, o_raw) && RV::usable(p, do_raw, o_raw)) {
    uint4 dv[RV::kPerThread], ov[RV::kPerThread];
    rv.load(p, dout, h, 0, dv);
    rv.load(p, o_raw, h, 0, ov);
    if (e < nt) s_den[e] = p.den[(s.t0 + e) * p.H + h];
    __syncthreads();
    for (int round = 0; round < rv.rounds(); ++round) {
      if (round > 0) {
        rv.load(p, dout, h, round, dv);
        rv.load(p, o_raw, h, round, ov);
      }
#pragma unroll
      for (int u = 0; u < RV::kPerThread; ++u) {
        const int i = rv.index(round, u);
        if (i >= rv.count) break;
        int j;
        const int64_t off = rv.offset(p, h, i, j);
        T* d = reinterpret_cast<T*>(&dv[u]);
        const T* x = reinterpret_cast<const T*>(&ov[u]);
        float dot = 0.f;
#pragma unroll
        for (int m = 0; m < RV::kVec; ++m) {
          const float dm = to_float(d[m]);
          dot += dm * to_float(x[m]);
          d[m] = from_float<T>(dm / s_den[j]);
        }
        *reinterpret_cast<uint4*>(do_raw + off) = dv[u];
        s_part[j][i - j * rv.vpr] = dot;
      }
    }
    __syncthreads();
    if (e < nt) {
      float dot = 0.f;
      for (int cv = 0; cv < rv.vpr; ++cv) dot += s_part[e][cv];  // fixed order
      const float w = -p.scale * dot / (p.dots_of_output ? s_den[e] : s_den[e] * s_den[e]);
      s_w[e] = w;
      p.w[(s.t0 + e) * p.H + h] = w;
    }
  } else {
    for (int j = warp; j < nt; j += kWarps) {
      const int64_t row = (s.t0 + j) * p.H + h;
      const float den = p.den[row];
      float dot = 0.f;
      for (int v = lane; v < p.V; v += 32) {
        const float d = to_float(dout[row * p.V + v]);
        dot += d * to_float(o_raw[row * p.V + v]);
        do_raw[row * p.V + v] = from_float<T>(d / den);
      }
      dot = warp_sum(dot);
      if (lane == 0) {
        const float w = -p.scale * dot / (p.dots_of_output ? den : den * den);
        s_w[j] = w;
        p.w[row] = w;
      }
    }
  }
  __syncthreads();
  if constexpr (kVR > 0) {
    vec_chunk_total(kt, qv, s_w, q_total);
  } else {
    if (e < p.K) q_total[e] = chunk_total(static_cast<const T*>(p.q), s_w, s, h, e, p);
  }
}

// dq_t = w_t c_t walking forward from the key carry; dk_t = the running sum of w q walking
// back from the reverse carry (each added to dq, dk with accumulate). w of the chunk is staged
// once (zeros past its last token, so a partial group adds nothing).
template <typename T>
__device__ __forceinline__ void chunk_grads(const NormalizeParams& p, const Span& s, int h, const float* s_w) {
  const int e = threadIdx.x;
  if (e >= p.K) return;
  const int nt = static_cast<int>(s.t1 - s.t0);
  const int64_t carry = (static_cast<int64_t>(blockIdx.x) * p.H + h) * p.K + e;
  const int64_t first = (s.t0 * p.H + h) * p.K + e, stride = static_cast<int64_t>(p.H) * p.K;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  T* dq = static_cast<T*>(p.dq) + first;
  T* dk = static_cast<T*>(p.dk) + first;

  float c = p.k_carry[carry];
  for (int j0 = 0; j0 < nt; j0 += kUnroll) {
    float x[kUnroll];
    load_channel(k, s.t0, j0, nt, h, e, p, x);
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      c += x[j];
      x[j] = s_w[j0 + j] * c;
    }
    store_channel(dq + j0 * stride, stride, nt - j0, x, p.accumulate);
  }
  float r = p.q_carry[carry];
  for (int j0 = (nt - 1) / kUnroll * kUnroll; j0 >= 0; j0 -= kUnroll) {
    float x[kUnroll];
    load_channel(q, s.t0, j0, nt, h, e, p, x);
#pragma unroll
    for (int j = kUnroll - 1; j >= 0; --j) {
      r += s_w[j0 + j] * x[j];
      x[j] = r;
    }
    store_channel(dk + j0 * stride, stride, nt - j0, x, p.accumulate);
  }
}

// The same from whole key vectors: both running sums start from the carries plus the row
// groups before (dq) or after (dk) the thread's own.
template <typename T, int kVR>
__device__ __forceinline__ void chunk_grads_vec(const NormalizeParams& p, const Span& s, int h, const float* s_w,
                                                const KeyTile<T, kVR>& kt, const uint4 (&kv)[KeyTile<T, kVR>::kRows],
                                                const uint4 (&qv)[KeyTile<T, kVR>::kRows]) {
  using KT = KeyTile<T, kVR>;
  constexpr int kVec = KT::kVec, kRows = KT::kRows;
  __shared__ __align__(16) typename KT::Partials s_k, s_wq;
  uint4 dq_old[kRows], dk_old[kRows];   // the gradients to add to (accumulate); dk's loaded
  if (p.accumulate) kt.load(p.dq, dq_old);   // once dq's are out (registers: 2 blocks per SM)
  const int64_t carry = (static_cast<int64_t>(blockIdx.x) * p.H + h) * KT::kK;
  float c[kVec], r[kVec], pk[kVec] = {}, pq[kVec] = {};
  kt.load_carry(p.k_carry + carry, c);
  kt.load_carry(p.q_carry + carry, r);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    float x[kVec], y[kVec];
    unpack<T>(kv[i], x);
    unpack<T>(qv[i], y);
    const float w = s_w[kt.row(i)];
#pragma unroll
    for (int m = 0; m < kVec; ++m) {
      pk[m] += x[m];
      pq[m] += w * y[m];
    }
  }
  kt.put(s_k, pk);
  kt.put(s_wq, pq);
  __syncthreads();
  kt.template add_groups<false>(s_k, c);
  kt.template add_groups<true>(s_wq, r);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    float x[kVec];
    unpack<T>(kv[i], x);
    const float w = s_w[kt.row(i)];
#pragma unroll
    for (int m = 0; m < kVec; ++m) {
      c[m] += x[m];
      x[m] = w * c[m];
    }
    kt.store(p.dq, i, x, p.accumulate, dq_old[i]);
  }
  if (p.accumulate) kt.load(p.dk, dk_old);
#pragma unroll
  for (int i = kRows - 1; i >= 0; --i) {
    float y[kVec];
    unpack<T>(qv[i], y);
    const float w = s_w[kt.row(i)];
#pragma unroll
    for (int m = 0; m < kVec; ++m) {
      r[m] += w * y[m];
      y[m] = r[m];
    }
    kt.store(p.dk, i, y, p.accumulate, dk_old[i]);
  }
}

// (two blocks per SM where a thread's rows fit 128 registers; K = 256 in 16-bit keeps 8 rows)
template <typename T, int kVR>
__global__ void __launch_bounds__(kThreads, kVR * 16 / int(sizeof(T)) >= 256 ? 1 : 2)
    normalize_bwd_grads_kernel(const NormalizeParams p) {
  using KT = KeyTile<T, (kVR > 0 ? kVR : 4)>;   // (unused when kVR == 0)
  __shared__ float s_w[C];
  const Span s = chunk_span(p, blockIdx.x);
  if (!s.ok) return;
  const int h = blockIdx.y, e = threadIdx.x;
  const int nt = static_cast<int>(s.t1 - s.t0);
  const KT kt(p, s, h);
  uint4 kv[KT::kRows], qv[KT::kRows];
  if constexpr (kVR > 0) {  // in flight while w is staged
    kt.load(p.k, kv);
    kt.load(p.q, qv);
  }
  if (e < C) s_w[e] = e < nt ? p.w[(s.t0 + e) * p.H + h] : 0.f;
  __syncthreads();
  if constexpr (kVR > 0) chunk_grads_vec<T, kVR>(p, s, h, s_w, kt, kv, qv);
  else chunk_grads<T>(p, s, h, s_w);
}

inline unsigned scan_blocks(const NormalizeParams& p) {
  return static_cast<unsigned>((static_cast<int64_t>(p.N) * p.H * p.K + kScanThreads - 1) / kScanThreads);
}

// 16-byte vectors per key row when the vector path takes the key-dim tensors at these
// pointers, else 0 (one thread per key channel: any K <= kThreads).
template <typename T>
int key_vectors(const NormalizeParams& p, std::initializer_list<const void*> key_tensors) {
  if (p.K * sizeof(T) % 16 != 0) return 0;
  const int vr = static_cast<int>(p.K * sizeof(T) / 16);
  if (vr != 4 && vr != 8 && vr != 16 && vr != 32) return 0;
  for (const void* x : key_tensors)
    if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return 0;
  return vr;
}

}  // namespace normalize

#define FLA_KEY_VECTORS_SWITCH(VR, KVR, ...)                        \
  [&] {                                                             \
    switch (VR) {                                                   \
      case 4: { constexpr int KVR = 4; return __VA_ARGS__(); }      \
      case 8: { constexpr int KVR = 8; return __VA_ARGS__(); }      \
      case 16: { constexpr int KVR = 16; return __VA_ARGS__(); }    \
      case 32: { constexpr int KVR = 32; return __VA_ARGS__(); }    \
      default: { constexpr int KVR = 0; return __VA_ARGS__(); }     \
    }                                                               \
  }()

template <typename T>
void run_normalize_fwd(const NormalizeParams& p, cudaStream_t stream) {
  using namespace normalize;
  const dim3 grid(static_cast<unsigned>(p.chunks), static_cast<unsigned>(p.H));
  const int vr = key_vectors<T>(p, {p.q, p.k, p.k_carry});
  if (p.chunks > 0) {
    FLA_KEY_VECTORS_SWITCH(vr, kVR, [&] { key_totals_kernel<T, kVR><<<grid, kThreads, 0, stream>>>(p); });
    FLA_CHECK_LAUNCH();
  }
  if (p.N > 0) {
    carry_scan_kernel<false><<<scan_blocks(p), kScanThreads, 0, stream>>>(p, p.k_carry, p.z0, p.z_final);
    FLA_CHECK_LAUNCH();
  }
  if (p.chunks > 0) {
    FLA_KEY_VECTORS_SWITCH(vr, kVR, [&] {
      const auto kernel = p.o != nullptr ? normalize_fwd_kernel<T, kVR, true> : normalize_fwd_kernel<T, kVR, false>;
      kernel<<<grid, kThreads, 0, stream>>>(p);
    });
    FLA_CHECK_LAUNCH();
  }
}

template <typename T>
void run_normalize_bwd_dots(const NormalizeParams& p, cudaStream_t stream) {
  using namespace normalize;
  const dim3 grid(static_cast<unsigned>(p.chunks), static_cast<unsigned>(p.H));
  const int vr = key_vectors<T>(p, {p.q, p.q_carry});
  if (p.chunks > 0) {
    FLA_KEY_VECTORS_SWITCH(vr, kVR, [&] { normalize_bwd_dots_kernel<T, kVR><<<grid, kThreads, 0, stream>>>(p); });
    FLA_CHECK_LAUNCH();
  }
  if (p.N > 0) {   // the sums after each chunk, from the last one (end_aligned: chunk 0)
    const auto scan = p.end_aligned ? carry_scan_kernel<false> : carry_scan_kernel<true>;
    scan<<<scan_blocks(p), kScanThreads, 0, stream>>>(p, p.q_carry, p.dz_final, p.dz0);
    FLA_CHECK_LAUNCH();
  }
}

template <typename T>
void run_normalize_bwd_grads(const NormalizeParams& p, cudaStream_t stream) {
  using namespace normalize;
  const dim3 grid(static_cast<unsigned>(p.chunks), static_cast<unsigned>(p.H));
  const int vr = key_vectors<T>(p, {p.q, p.k, p.dq, p.dk, p.k_carry, p.q_carry});
  if (p.chunks > 0) {
    FLA_KEY_VECTORS_SWITCH(vr, kVR, [&] { normalize_bwd_grads_kernel<T, kVR><<<grid, kThreads, 0, stream>>>(p); });
    FLA_CHECK_LAUNCH();
  }
}

}  // namespace fla
